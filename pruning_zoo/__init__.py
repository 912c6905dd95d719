"""pruning-zoo: visual-token pruning strategies for vision-language models, compared on equal terms.

Importing this package patches nothing and loads no plugin; plugins load on first use of the registries. The
strategy interface is imported on first use too (it needs torch, which takes seconds to import), so that
`pruning-zoo --help` and the modules that need no tensors start at once.
"""

import importlib

from pruning_zoo.budget import Budget, BudgetMeaning
from pruning_zoo.errors import InvalidParameterError, PluginError, PruningZooError, UnknownNameError
from pruning_zoo.hookspecs import hookimpl

#: The version of the plugin interface (docs/plugins.md): the hooks, the strategy class's members, ScoreContext,
#: Selection, Stage and the observation names. A minor step only adds; a major step changes or removes, after a
#: release that warns. Plugins may rely on everything documented for the major version they were written for.
INTERFACE_VERSION = "1.0"

#: Names this package exports from pruning_zoo.strategy, imported when first read.
STRATEGY_INTERFACE = ("PruningStrategy", "ScoreContext", "Selection", "Stage", "StrategyParams", "params_dataclass",
                      "top_k_in_order")

__all__ = [
    "Budget",
    "BudgetMeaning",
    "INTERFACE_VERSION",
    "InvalidParameterError",
    "PluginError",
    "PruningZooError",
    "UnknownNameError",
    "get_strategy",
    "hookimpl",
    *STRATEGY_INTERFACE,
]


def __getattr__(name: str):
    if name in STRATEGY_INTERFACE:
        return getattr(importlib.import_module("pruning_zoo.strategy"), name)
    raise AttributeError(f"module 'pruning_zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def get_strategy(name: str, **params):
    """An installed strategy by name, with parameters validated: `get_strategy("fastv", k=3)`."""
    from pruning_zoo import plugins

    return plugins.strategies().get(name)(params)
