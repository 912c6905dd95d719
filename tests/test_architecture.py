"""The package's parts and the one direction of their imports (docs/architecture.md).

Every import in pruning_zoo/, strategies/ and suites/ is read from the source, function-level and TYPE_CHECKING
imports included: a part imports only itself and the parts below it, nothing imports the public facade
(`pruning_zoo/__init__.py`) or the deprecated shims, and no modules import each other in a circle.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
#: Folders of the installed package (pyproject's package-dir): strategies/ and suites/ install inside pruning_zoo.
SOURCES = {"pruning_zoo": REPOSITORY / "pruning_zoo", "pruning_zoo.strategies": REPOSITORY / "strategies",
           "pruning_zoo.suites": REPOSITORY / "suites"}
#: Each part's rank: a part imports only from itself and from parts of a lower rank.
RANKS = {
    "foundation": 0,  # errors.py, inputs.py, provenance.py: used by every part
    "suites": 0,  # data files and lmms-eval task helpers
    "strategy": 1,  # the strategy interface
    "plugins": 2,  # hooks, registries, entry-point loading
    "strategies": 3,  # the built-in strategies: plugins like any other
    "engine": 3,  # hooks over transformers models, adapters, observations
    "testbed": 4,  # the offline testbed: scenes, questions, its tiny VLM
    "bench": 4,  # the latency benchmark
    "eval": 5,  # suites, the sweep through lmms-eval, the result store
    "train": 6,  # training LearnPruner's module
    "leaderboard": 6,  # tables and plots from stored results
    "cli": 7,  # argument parsing only
    "facade": 8,  # pruning_zoo/__init__.py: the public names
    "shims": 8,  # deprecated module paths
}
FOUNDATION = {"pruning_zoo.errors", "pruning_zoo.inputs", "pruning_zoo.provenance"}
SHIMS = {"pruning_zoo.hookspecs", "pruning_zoo.families"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if package == "pruning_zoo" and parts[0] in ("strategies", "suites"):
                continue
            modules[name] = path
    return modules


MODULES = module_files()


def part(module: str) -> str:
    if module == "pruning_zoo":
        return "facade"
    if module in FOUNDATION:
        return "foundation"
    if module in SHIMS:
        return "shims"
    return module.split(".")[1]


def imported_modules(module: str, path: Path) -> set[str]:
    """The pruning_zoo modules `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pruning_zoo import plugins` imports a module; `from pruning_zoo import prune`, a name.
            submodules = {f"{source}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {source})
    return {name for name in found if name.split(".")[0] == "pruning_zoo"}


IMPORTS = {module: imported_modules(module, path) for module, path in MODULES.items()}


def test_every_module_is_in_a_known_part():
    unknown = sorted(module for module in MODULES if part(module) not in RANKS)
    assert not unknown, f"modules in no part of RANKS (add the folder to RANKS and docs/architecture.md): {unknown}"


def test_every_import_names_a_module_that_exists():
    missing = sorted((module, name) for module, names in IMPORTS.items() for name in names if name not in MODULES)
    assert not missing


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    own = part(module)
    upward = sorted(name for name in IMPORTS[module]
                    if part(name) != own and RANKS[part(name)] >= RANKS[own])
    assert not upward, f"{module} ({own}) imports {upward}: a part imports only itself and parts below it"


def test_no_module_imports_the_facade_or_a_shim():
    offenders = sorted((module, name) for module, names in IMPORTS.items() for name in names
                       if part(name) in ("facade", "shims") and part(module) not in ("facade", "shims"))
    assert not offenders


def test_no_import_circle():
    graph = {module: names & MODULES.keys() for module, names in IMPORTS.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"modules import each other in a circle: {' -> '.join(error.args[1])}")


def test_the_check_sees_an_upward_import(tmp_path):
    """The test itself: an engine module importing the evaluation is caught, and so is a circle."""
    engine = tmp_path / "engine.py"
    engine.write_text("from pruning_zoo.eval.runner import Sweep\n")
    names = imported_modules("pruning_zoo.engine.fake", engine)
    assert names == {"pruning_zoo.eval.runner"}
    assert RANKS[part("pruning_zoo.eval.runner")] > RANKS[part("pruning_zoo.engine.fake")]
    graph = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(graph).static_order())


OLD_STYLE_PLUGIN = '''
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from pruning_zoo.hookspecs import hookimpl            # 0.1.0's path, as plugins wrote it
    from pruning_zoo.families import ModelFamily
import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Stage

assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning], caught
assert "pruning_zoo.plugins.hookspecs" in str(caught[0].message)
assert hookimpl is pruning_zoo.hookimpl and ModelFamily is pruning_zoo.ModelFamily


class KeepFirst(PruningStrategy):
    name = "keep-first"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        import torch
        return -torch.arange(ctx.tokens.shape[0], dtype=torch.float32)


class OldPlugin:
    @hookimpl
    def register_strategies(register):
        register(KeepFirst)


manager = plugins.make_plugin_manager(load_entry_points=False)
manager.register(OldPlugin)
registry = plugins.collect_strategies(manager)
print(registry.get("keep-first")().plan(4, 10, 2))
'''


def test_a_plugin_written_against_the_old_paths_still_registers():
    """pruning_zoo.hookspecs and pruning_zoo.families moved; their old paths warn and keep working."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OLD_STYLE_PLUGIN], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "(Stage(after_layer=None, keep=4),)"


def test_the_public_api_is_where_it_was():
    import pruning_zoo
    from pruning_zoo import engine, plugins, strategy
    from pruning_zoo.engine import run

    assert pruning_zoo.prune is engine.prune is run.prune
    assert pruning_zoo.get_strategy is plugins.get_strategy
    assert pruning_zoo.PruningStrategy is strategy.PruningStrategy
    assert set(pruning_zoo.__all__) >= {"prune", "get_strategy", "hookimpl", "PruningStrategy", "ScoreContext",
                                        "Selection", "Stage", "StrategyParams", "params_dataclass", "Budget",
                                        "BudgetMeaning", "INTERFACE_VERSION", "ModelFamily", "PruningZooError"}
    from importlib.metadata import entry_points

    assert {entry.name for entry in entry_points(group="lmms_eval.models")} >= {"pruning_zoo"}
    assert {"fastv", "model_families"} <= {entry.name for entry in entry_points(group="pruning_zoo")}
