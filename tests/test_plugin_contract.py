"""docs/plugins.md is the plugin contract: its own snippets, written to files and installed as a distribution, make
a plugin that registers, lists, validates its parameters, selects and runs a sweep; the registration rules it
states hold."""

import re
from pathlib import Path

import pytest
import tomllib
import torch
from typer.testing import CliRunner

import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.cli import app
from pruning_zoo.errors import InvalidParameterError, PluginError
from pruning_zoo.eval.runner import Sweep
from pruning_zoo.eval.suite import validate_suite
from pruning_zoo.plugins.hookspecs import hookimpl
from pruning_zoo.plugins.registry import Source
from pruning_zoo.strategy import OBSERVATIONS, ScoreContext, Stage

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def snippets() -> dict[str, tuple[str, str]]:
    """kind -> (file name, text) of each `<!-- contract: KIND FILE -->` block of the docs."""
    found = re.findall(r"<!-- contract: (\w+) (\S+) -->\n```\w+\n(.*?)```", DOCS.read_text(), flags=re.S)
    return {kind: (name, text) for kind, name, text in found}


@pytest.fixture
def documented_plugin(tmp_path, fresh_plugins):
    """The docs' plugin as an installed distribution: its module, and the dist-info pip would write from its
    pyproject (the entry points and the name and version), on sys.path."""
    parts = snippets()
    module_name, module_text = parts["module"]
    _, pyproject_text = parts["pyproject"]
    project = tomllib.loads(pyproject_text)["project"]
    site = tmp_path / "site"
    site.mkdir()
    (site / module_name).write_text(module_text)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
                           for group, points in project["entry-points"].items())
    (info / "entry_points.txt").write_text(entry_points)
    fresh_plugins.syspath_prepend(str(site))
    fresh_plugins.delenv(plugins.PLUGINS_ENV, raising=False)
    plugins.reset()
    return project


def test_the_docs_hold_both_snippets():
    assert set(snippets()) == {"module", "pyproject"}


def test_the_documented_plugin_registers_and_lists_with_its_distribution(documented_plugin):
    entry = plugins.strategies().entry("l2-norm")
    assert entry.source.distribution == "l2-norm-plugin" and entry.source.version == "0.1.0"
    assert entry.value.observes == frozenset()  # the docs give a tuple: registration makes it a frozenset
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    row = next(line for line in result.output.splitlines() if "l2-norm" in line)
    assert "l2-norm-plugin 0.1.0" in row


def test_the_documented_plugin_validates_and_selects(documented_plugin):
    strategy = pruning_zoo.get_strategy("l2-norm", order="smallest")
    tokens = torch.tensor([[3.0, 4.0], [0.1, 0.0], [1.0, 0.0], [0.0, 2.0]])
    (stage,) = strategy.plan(2, 4, 6)
    ctx = ScoreContext(stage=stage, tokens=tokens, num_layers=6)
    assert strategy.select(strategy.score(ctx), stage.keep, ctx).keep.tolist() == [1, 2]  # norms 0.1 and 1
    assert strategy.params.positions == "renumber"  # the base's field, documented
    with pytest.raises(InvalidParameterError, match=r"l2-norm.order"):
        pruning_zoo.get_strategy("l2-norm", order="middle")


def test_the_documented_plugin_runs_a_sweep_and_its_results_name_its_code(documented_plugin, tiny_testbed_model,
                                                                         tmp_path):
    suite = validate_suite({"name": "t", "tasks": ["testbed"], "models": [tiny_testbed_model], "limit": 2,
                            "strategies": {"l2-norm": {"order": "smallest"}}, "budgets": [64]}, origin="t")
    (outcome,) = Sweep(suite, tmp_path, device="cpu").run()
    assert outcome.status == "finished", outcome.error
    import json

    code = json.loads((outcome.folder / "config.json").read_text())["strategy_code"]
    assert code["distribution"] == "l2-norm-plugin" and code["version"] == "0.1.0"
    assert code["module"] == "l2_norm_plugin" and code["interface"] == pruning_zoo.INTERFACE_VERSION
    assert len(code["source_sha256"]) == 16


def strategy_with(observes):
    return type("Observing", (pruning_zoo.PruningStrategy,), {
        "name": "observing", "budget_meaning": pruning_zoo.BudgetMeaning.ENTERING_LLM, "observes": observes,
        "plan": lambda self, budget, n, layers: (Stage(None, budget),), "score": lambda self, ctx: ctx.tokens[:, 0]})


@pytest.mark.parametrize("observes", [("vision_attention",), ["vision_attention"], {"vision_attention"}])
def test_any_collection_of_observation_names_is_taken(observes):
    cls = strategy_with(observes)
    plugins.check_strategy_class(cls, Source("test"))
    assert cls.observes == frozenset({"vision_attention"})


@pytest.mark.parametrize("observes, complaint", [
    ("vision_attention", "give a collection of observation names"),
    (42, "give a collection of observation names"),
    (("vision_atention",), "names 'vision_atention', which the engine does not provide; known observations:"),
])
def test_a_wrong_observes_is_refused_when_registered(observes, complaint):
    with pytest.raises(PluginError, match=re.escape(complaint)):
        plugins.check_strategy_class(strategy_with(observes), Source("test"))


def test_the_documented_observations_are_the_engines():
    section = DOCS.read_text().split("\n## Observations", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)(?:\(|`)", section, flags=re.M))
    assert documented == OBSERVATIONS


class LoosePlugin:
    @hookimpl
    def register_strategies(self, register):
        register(strategy_with(("vision_attention", "vision_keys")))


def test_a_strategy_registered_with_a_tuple_runs(fresh_plugins, tiny_testbed_model, tmp_path):
    """The finding of the third-party trial: a tuple passed registration, then every cell failed."""
    plugins.reset()
    plugins.plugin_manager().register(LoosePlugin(), name="loose")
    suite = validate_suite({"name": "t", "tasks": ["testbed"], "models": [tiny_testbed_model], "limit": 2,
                            "strategies": {"observing": {}}, "budgets": [64]}, origin="t")
    (outcome,) = Sweep(suite, tmp_path, device="cpu").run()
    assert outcome.status == "finished", outcome.error
