"""The plugin contract: every hook is documented with its exact signature and has a test here."""

import inspect
import re
from pathlib import Path

import pytest

import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.engine.families import ModelFamily
from pruning_zoo.errors import PluginError
from pruning_zoo.plugins import collect_model_families, collect_strategies, hookspecs, make_plugin_manager
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Stage

DOCS = Path(__file__).parents[1] / "docs" / "plugins.md"
HOOK_NAMES = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_"))


def test_hooks_are_found():
    assert HOOK_NAMES == ["register_model_families", "register_strategies"]


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_documented_with_its_signature(hook):
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
    assert re.search(rf"^### {re.escape(signature)}$", DOCS.read_text(), re.MULTILINE), (
        f"docs/plugins.md needs a '### {signature}' section"
    )


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_has_a_test(hook):
    assert f"test_hook_{hook}" in globals(), f"tests/test_hooks.py needs test_hook_{hook}"


class Halve(PruningStrategy):
    name = "halve"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        return ctx.tokens.sum(-1)


class HalvePlugin:
    @pruning_zoo.hookimpl
    def register_strategies(self, register):
        register(Halve)


def test_hook_register_strategies():
    manager = make_plugin_manager(load_entry_points=False)
    manager.register(HalvePlugin(), name="halve-plugin")
    try:
        registry = collect_strategies(manager)
        assert registry.names() == ["halve"]
        entry = registry.entry("halve")
        assert entry.value is Halve and entry.source.plugin == "halve-plugin"
        assert entry.source.distribution is None
    finally:
        manager.unregister(name="halve-plugin")
    assert collect_strategies(manager).names() == []


def test_hook_register_model_families():
    family = ModelFamily(name="tiny", model_types=("tiny",), model_class="TinyForConditionalGeneration", description="")

    class FamilyPlugin:
        @pruning_zoo.hookimpl
        def register_model_families(self, register):
            register(family)

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(FamilyPlugin(), name="family-plugin")
    assert collect_model_families(manager).get("tiny") is family


def test_builtins_come_from_the_pruning_zoo_distribution(fresh_plugins):
    fresh_plugins.delenv(plugins.PLUGINS_ENV, raising=False)
    for name in ("none", "random", "pool", "fastv"):
        source = plugins.strategies().entry(name).source
        assert source.distribution == "pruning-zoo", source
    assert set(plugins.model_families().names()) >= {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"}


def test_a_name_registered_twice_names_both_distributions(fresh_plugins):
    """The example plugin (installed by the README's test command) and a local plugin both claim a name."""
    fresh_plugins.delenv(plugins.PLUGINS_ENV, raising=False)
    example = plugins.strategies().get("feature-norm")

    class Impostor(Halve):
        name = "feature-norm"

    class ImpostorPlugin:
        @pruning_zoo.hookimpl
        def register_strategies(self, register):
            register(Impostor)

    manager = make_plugin_manager()
    manager.register(ImpostorPlugin(), name="impostor")
    with pytest.raises(PluginError) as error:
        collect_strategies(manager)
    message = str(error.value)
    assert "'feature-norm' is registered twice" in message
    assert "pruning-zoo-example 0.1.0" in message and "'impostor'" in message
    assert example.name == "feature-norm"


def test_a_misspelled_hook_is_caught():
    class Misspelled:
        @pruning_zoo.hookimpl
        def register_stratgies(self, register):
            raise AssertionError("never called")

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(Misspelled(), name="misspelled")
    with pytest.raises(PluginError, match="register_stratgies.*hooks are: register_model_families, register_strategies"):
        plugins.check_hook_names(manager)


def test_the_environment_variable_limits_strategies_but_keeps_the_model_families(fresh_plugins):
    fresh_plugins.setenv(plugins.PLUGINS_ENV, "fastv")
    assert plugins.strategies().names() == ["fastv"]
    assert plugins.model_families().names() == ["llava", "llava_next", "qwen2_5_vl", "qwen2_vl"]


def test_an_empty_environment_variable_loads_no_strategy(fresh_plugins):
    fresh_plugins.setenv(plugins.PLUGINS_ENV, "")
    assert plugins.strategies().names() == [] and "llava" in plugins.model_families()


def test_a_plugin_subset_runs_a_builtin_suite_with_its_strategies(fresh_plugins, tmp_path):
    """Under PRUNING_ZOO_PLUGINS=fastv,baselines the testbed suite (which names transprune, learnpruner, ...) runs
    with --strategies from that subset; a strategy outside it is an error that says why."""
    from typer.testing import CliRunner

    from pruning_zoo.cli import app

    fresh_plugins.setenv(plugins.PLUGINS_ENV, "fastv,baselines")
    dry = CliRunner().invoke(app, ["run", "--suite", "testbed", "--strategies", "none,fastv", "--dry-run",
                                   "--output", str(tmp_path)])
    assert dry.exit_code == 0, dry.output
    run = CliRunner().invoke(app, ["run", "--suite", "testbed", "--strategies", "none,fastv", "--limit", "2",
                                   "--budgets", "64", "--device", "cpu", "--output", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert len([path for path in (tmp_path / "out").iterdir() if path.is_dir()]) == 2
    other = CliRunner().invoke(app, ["run", "--suite", "testbed", "--dry-run", "--output", str(tmp_path)])
    text = " ".join(other.output.split())
    assert other.exit_code == 2 and "unknown strategy 'visionzip' known: fastv, none, pool, random." in text
    assert "PRUNING_ZOO_PLUGINS='fastv,baselines' loads only those plugins" in text


def test_an_unknown_plugin_in_the_environment_variable_is_an_error(fresh_plugins):
    fresh_plugins.setenv(plugins.PLUGINS_ENV, "fastV")
    with pytest.raises(PluginError, match="unknown plugin 'fastV'; did you mean 'fastv'\\? known: .*baselines"):
        plugins.strategies()


@pytest.mark.parametrize(
    "broken, complaint",
    [
        (int, "not a PruningStrategy subclass"),
        (type("Upper", (Halve,), {"name": "Halve"}), "must be a lower-case name"),
        (type("NoMeaning", (Halve,), {"name": "nomeaning", "budget_meaning": "tokens"}), "budget_meaning"),
        (type("NoParams", (Halve,), {"name": "noparams", "Params": dict}), "Params must subclass StrategyParams"),
        (type("Abstract", (PruningStrategy,), {"name": "abstract", "budget_meaning": BudgetMeaning.ENTERING_LLM}),
         "does not implement plan, score"),
    ],
)
def test_a_broken_registration_names_the_plugin(broken, complaint):
    class BrokenPlugin:
        @pruning_zoo.hookimpl
        def register_strategies(self, register):
            register(broken)

    manager = make_plugin_manager(load_entry_points=False)
    manager.register(BrokenPlugin(), name="broken")
    with pytest.raises(PluginError, match=f"register_strategies of plugin 'broken'.*{complaint}"):
        collect_strategies(manager)
