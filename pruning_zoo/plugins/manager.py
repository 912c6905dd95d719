"""Loading plugins from the `pruning_zoo` entry-point group and collecting what they register.

Built-in strategies and model families are plugins of the `pruning-zoo` distribution, loaded exactly like
third-party ones. Set PRUNING_ZOO_PLUGINS to a comma-separated list of entry-point names to load only
those (an empty value loads none); pruning-zoo's own model families load in any case.
"""

from __future__ import annotations

import functools
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from importlib.metadata import entry_points

import pluggy

from pruning_zoo.errors import PluginError, UnknownNameError
from pruning_zoo.plugins import hookspecs
from pruning_zoo.plugins.families import ModelFamily
from pruning_zoo.plugins.registry import Registry, Source
from pruning_zoo.strategy import OBSERVATIONS, PruningStrategy, StrategyParams
from pruning_zoo.strategy.budget import BudgetMeaning

ENTRY_POINT_GROUP = "pruning_zoo"
PLUGINS_ENV = "PRUNING_ZOO_PLUGINS"
#: The entry point of pruning-zoo's own model families, loaded whatever PRUNING_ZOO_PLUGINS says.
BUILTIN_FAMILIES = "model_families"
_STRATEGY_NAME = re.compile(r"[a-z][a-z0-9_\-]*")


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with pruning-zoo's hooks; loads installed plugins unless told not to (tests)."""
    manager = pluggy.PluginManager("pruning_zoo")
    manager.add_hookspecs(hookspecs)
    if load_entry_points:
        load_entry_point_plugins(manager)
    return manager


def load_entry_point_plugins(manager: pluggy.PluginManager) -> None:
    available = entry_points(group=ENTRY_POINT_GROUP)
    providers = defaultdict(list)
    for entry_point in available:
        providers[entry_point.name].append(entry_point.dist.name if entry_point.dist else "?")
    for name, distributions in providers.items():
        if len(distributions) > 1:
            raise PluginError(
                f"plugin name {name!r} is declared by several distributions: {', '.join(distributions)}; "
                "uninstall all but one"
            )

    wanted = os.environ.get(PLUGINS_ENV)
    if wanted is None:
        names = sorted(providers)
    else:
        names = [name.strip() for name in wanted.split(",") if name.strip()]
        for name in names:
            if name not in providers:
                raise PluginError(f"{PLUGINS_ENV}: {UnknownNameError('plugin', name, providers)}")
        # The allow-list picks strategies: pruning-zoo's own model families always load, so that a subset of
        # strategies still runs on every supported model.
        if BUILTIN_FAMILIES in providers and BUILTIN_FAMILIES not in names:
            names.append(BUILTIN_FAMILIES)

    for name in names:
        try:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception as error:
            raise PluginError(
                f"plugin {name!r} (from {', '.join(providers[name])}) failed to load: {error!r}. "
                f"Fix or uninstall it, or leave it out with {PLUGINS_ENV}"
            ) from error
    check_hook_names(manager)


def check_hook_names(manager: pluggy.PluginManager) -> None:
    """Catch hook implementations whose names match no hook (a misspelling would silently do nothing)."""
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        known = ", ".join(sorted(name for name in dir(hookspecs) if name.startswith("register_")))
        raise PluginError(f"{error}. pruning-zoo's hooks are: {known}") from None


def _source(manager: pluggy.PluginManager, plugin: object) -> Source:
    distributions = dict(manager.list_plugin_distinfo())
    name = manager.get_name(plugin) or repr(plugin)
    distribution = distributions.get(plugin)
    if distribution is None:
        return Source(plugin=name)
    return Source(plugin=name, distribution=distribution.project_name, version=distribution.version)


def _call_each(manager: pluggy.PluginManager, hook_name: str, register_for) -> None:
    """Call a registration hook plugin by plugin, so each registration knows its source."""
    for implementation in getattr(manager.hook, hook_name).get_hookimpls():
        source = _source(manager, implementation.plugin)
        arguments = {"register": functools.partial(register_for, source)}
        implementation.function(*[arguments[name] for name in implementation.argnames])


def collect_strategies(manager: pluggy.PluginManager) -> Registry[type[PruningStrategy]]:
    registry: Registry[type[PruningStrategy]] = Registry("strategy")

    def register(source: Source, strategy_class) -> None:
        check_strategy_class(strategy_class, source)
        registry.add(strategy_class.name, strategy_class, source)

    _call_each(manager, "register_strategies", register)
    return registry


def check_strategy_class(strategy_class, source: Source) -> None:
    """Refuse a registration that would only fail later, naming the plugin at fault."""
    where = f"register_strategies of {source}"
    if not (isinstance(strategy_class, type) and issubclass(strategy_class, PruningStrategy)):
        raise PluginError(f"{where} registered {strategy_class!r}, which is not a PruningStrategy subclass")
    name = getattr(strategy_class, "name", None)
    if not isinstance(name, str) or not _STRATEGY_NAME.fullmatch(name):
        raise PluginError(
            f"{where}: {strategy_class.__name__}.name is {name!r}; it must be a lower-case name such as 'fastv'"
        )
    if not (isinstance(strategy_class.Params, type) and issubclass(strategy_class.Params, StrategyParams)):
        raise PluginError(f"{where}: {strategy_class.__name__}.Params must subclass StrategyParams")
    if not isinstance(getattr(strategy_class, "budget_meaning", None), BudgetMeaning):
        raise PluginError(f"{where}: {strategy_class.__name__}.budget_meaning must be a BudgetMeaning")
    strategy_class.observes = observation_names(strategy_class, where)
    if strategy_class.__abstractmethods__:
        missing = ", ".join(sorted(strategy_class.__abstractmethods__))
        raise PluginError(f"{where}: {strategy_class.__name__} does not implement {missing}")


def observation_names(strategy_class, where: str) -> frozenset[str]:
    """A strategy's `observes` as the frozenset the engine uses: any collection of known observation names."""
    observes = getattr(strategy_class, "observes", frozenset())
    example = "observes = {'vision_attention'}"
    if isinstance(observes, (str, bytes)) or not isinstance(observes, Iterable):
        raise PluginError(f"{where}: {strategy_class.__name__}.observes is {observes!r}; give a collection of "
                          f"observation names, e.g. {example}")
    names = tuple(observes)
    unknown = sorted(repr(name) for name in names if name not in OBSERVATIONS)
    if unknown:
        raise PluginError(f"{where}: {strategy_class.__name__}.observes names {', '.join(unknown)}, which the engine "
                          f"does not provide; known observations: {', '.join(sorted(OBSERVATIONS))}")
    return frozenset(names)


def collect_model_families(manager: pluggy.PluginManager) -> Registry[ModelFamily]:
    registry: Registry[ModelFamily] = Registry("model family")

    def register(source: Source, family) -> None:
        if not isinstance(family, ModelFamily):
            raise PluginError(f"register_model_families of {source} registered {family!r}, not a ModelFamily")
        registry.add(family.name, family, source)

    _call_each(manager, "register_model_families", register)
    return registry


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loaded on first use (nothing is loaded at import)."""
    return make_plugin_manager()


@functools.cache
def strategies() -> Registry[type[PruningStrategy]]:
    return collect_strategies(plugin_manager())


@functools.cache
def model_families() -> Registry[ModelFamily]:
    return collect_model_families(plugin_manager())


def reset() -> None:
    """Forget loaded plugins, so the next use loads them again (tests, or after installing a plugin)."""
    for cached in (plugin_manager, strategies, model_families):
        cached.cache_clear()


def get_strategy(name: str, **params) -> PruningStrategy:
    """An installed strategy by name, with parameters validated: `get_strategy("fastv", k=3)`."""
    return strategies().get(name)(params)
