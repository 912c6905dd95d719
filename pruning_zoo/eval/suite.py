"""Suites: which tasks, models, strategies and budgets to sweep, read from YAML files under suites/, with the
command line's options laid over them and their relative paths resolved."""

from __future__ import annotations

import importlib.resources
import itertools
import os
from pathlib import Path
from typing import Any

import pydantic

from pruning_zoo import inputs, plugins
from pruning_zoo.errors import InvalidParameterError, Problems, PruningZooError, UnknownNameError
from pruning_zoo.inputs import check_name, shown, yaml_mapping
from pruning_zoo.strategy import build_params
from pruning_zoo.strategy.budget import Budget, check_budget, parse_budget
from pruning_zoo.strategy.params import parse_param_overrides


class Suite(pydantic.BaseModel):
    """One suite file. Every field can be overridden from the command line."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    #: lmms-eval task names, or names of local task YAMLs (under suites/ or in `task_paths`).
    tasks: list[str] = pydantic.Field(min_length=1)
    #: More folders of lmms-eval task YAMLs (relative to the suite file), for tasks over local data.
    task_paths: list[str] = pydantic.Field(default_factory=list)
    #: Folder of local copies of the tasks' hub datasets, each as DIR/OWNER/NAME laid out as its repository (relative
    #: paths: to the working directory, else to the suite file's folder); None: the hub (or its cache).
    data: str | None = None
    #: Hub ids or local paths that `from_pretrained` accepts (relative paths: to the suite file's folder).
    models: list[str] = pydantic.Field(min_length=1)
    #: Strategy name -> parameter overrides ({} for the defaults).
    strategies: dict[str, dict[str, Any]] = pydantic.Field(min_length=1)
    # Strict numbers: YAML's `true` is not the count 1.
    budgets: list[pydantic.StrictInt | pydantic.StrictFloat] = pydantic.Field(min_length=1)
    #: At most this many documents per task (None: all).
    limit: pydantic.StrictInt | None = pydantic.Field(default=None, ge=1, le=10**9)
    batch_size: pydantic.StrictInt = pydantic.Field(default=1, ge=1, le=4096)

    @pydantic.field_validator("name", "tasks", "strategies")
    @classmethod
    def _names_are_names(cls, value):
        for name in [value] if isinstance(value, str) else value:
            check_name(name, "name")
        return value

    @pydantic.field_validator("models", "task_paths")
    @classmethod
    def _paths_are_given(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.strip() or len(path) > 4096 or not path.isprintable():
                raise ValueError(f"{shown(path)} is not a hub id or a path")
        return value

    @pydantic.field_validator("budgets")
    @classmethod
    def _budgets_are_valid(cls, budgets: list[Budget]) -> list[Budget]:
        for budget in budgets:
            check_budget(budget)
        return budgets

    def check_strategies(self) -> None:
        """Every strategy is registered and its parameters validate; one PruningZooError names every problem."""
        registry = plugins.strategies()
        problems = Problems()
        for name, params in self.strategies.items():
            if name not in registry and os.environ.get(plugins.PLUGINS_ENV) is not None:
                problems.add(UnknownNameError("strategy", name, registry.names()).with_hint(
                    f"{plugins.PLUGINS_ENV}={os.environ[plugins.PLUGINS_ENV]!r} loads only those plugins: choose "
                    "strategies from them with --strategies, or unset it"))
                continue
            strategy = problems.check(registry.get, name)
            if strategy is not None:
                problems.check(build_params, name, strategy.Params, params)
        problems.raise_if_any(f"the strategies of suite {self.name} are invalid")

    def cells(self) -> list[tuple[str, str, str, Budget]]:
        """(model, task, strategy, budget) for every cell of the sweep; 'none' runs once per model and task,
        with budget 1.0 (every token)."""
        result = []
        for model, task, strategy in itertools.product(self.models, self.tasks, self.strategies):
            budgets = [1.0] if strategy == "none" else self.budgets
            result.extend((model, task, strategy, budget) for budget in budgets)
        return result


def builtin_suite_folder() -> Path:
    return Path(str(importlib.resources.files("pruning_zoo.suites")))


def builtin_suite_files() -> dict[str, Path]:
    return {path.stem: path for path in builtin_suite_folder().iterdir() if path.name.endswith(".yaml")}


def suite_file(name_or_path: str) -> Path:
    """The file of a built-in suite by name, or a suite file by path."""
    check_name(name_or_path, "suite")
    path = Path(name_or_path)
    if not (path.suffix in {".yaml", ".yml"} and os.path.lexists(path)):
        files = builtin_suite_files()
        if name_or_path not in files:
            if path.suffix in {".yaml", ".yml"}:
                raise PruningZooError(f"suite file {name_or_path} does not exist")
            raise UnknownNameError("suite", name_or_path, files)
        path = files[name_or_path]
    return path


def load_suite(name_or_path: str, check_strategies: bool = True) -> Suite:
    """A built-in suite by name, or a suite file by path. `check_strategies=False` leaves the strategies to be
    checked after the command line replaced them (a strategy the user leaves out need not be installed)."""
    path = suite_file(name_or_path)
    data = yaml_mapping(path, "suite file")
    data.setdefault("name", path.stem)
    return validate_suite(data, origin=str(path), check_strategies=check_strategies)


def validate_suite(data: dict[str, Any], origin: str, check_strategies: bool = True) -> Suite:
    try:
        suite = Suite(**data)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            f" (got {shown(problem.get('input'))})"
            for problem in error.errors()
        )
        allowed = ", ".join(Suite.model_fields)
        raise InvalidParameterError(f"suite {origin} is invalid: {problems}. Suite fields: {allowed}") from None
    if check_strategies:
        suite.check_strategies()
    return suite


def with_overrides(
    suite: Suite,
    model: list[str] | None,
    tasks: list[str] | None,
    strategies: list[str] | None,
    budgets: list[str] | None,
    params: list[str],
    limit: int | None,
    batch_size: int | None,
    task_paths: list[str] | None = None,
    data_folder: Path | None = None,
) -> Suite:
    """The suite with the command line's options replacing its fields, validated again as a whole."""
    data: dict[str, Any] = suite.model_dump()
    if model is not None:
        data["models"] = model
    if tasks is not None:
        data["tasks"] = tasks
    if strategies is not None:
        data["strategies"] = {name: suite.strategies.get(name, {}) for name in strategies}
    if budgets is not None:
        data["budgets"] = [parse_budget(budget) for budget in budgets]
    for strategy, values in parse_param_overrides(params).items():
        if strategy not in data["strategies"]:
            raise InvalidParameterError(
                f"--param names strategy {strategy!r}, which this run does not include; "
                f"its strategies are: {', '.join(data['strategies'])}"
            )
        data["strategies"][strategy] = {**data["strategies"][strategy], **values}
    if limit is not None:
        data["limit"] = limit
    if batch_size is not None:
        data["batch_size"] = batch_size
    if task_paths is not None:
        data["task_paths"] = [str(Path(path).resolve()) for path in task_paths] + data["task_paths"]
    if data_folder is not None:
        inputs.input_folder(data_folder, "--data", "a folder of local dataset copies, each as DIR/OWNER/NAME (see "
                                                   "docs/real-datasets.md)")
        data["data"] = str(data_folder.resolve())
    return validate_suite(data, origin=f"{suite.name} (with command-line options)")


def resolve_data_folder(name: str | None, suite_folder: Path | None) -> Path | None:
    """The suite's data folder: absolute, else relative to the working directory if there, else to the suite file."""
    if name is None:
        return None
    path = Path(name)
    if not path.is_absolute() and not path.is_dir() and suite_folder is not None:
        path = suite_folder / path
    return path.resolve()


def resolve_model(name: str, suite_folder: Path | None) -> str:
    """A folder relative to the working directory, else one relative to the suite file, else a hub id."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    if suite_folder is not None and (suite_folder / name).is_dir():
        return str((suite_folder / name).resolve())
    return name


def resolve_paths(params: dict[str, Any], suite_folder: Path | None) -> dict[str, Any]:
    """Strategy parameters that name a path relative to the suite file (e.g. learnpruner's `module`) resolved
    to it, as model paths are; anything else as given."""
    resolved = {}
    for name, value in params.items():
        if (isinstance(value, str) and suite_folder is not None and not Path(value).exists()
                and (suite_folder / value).exists()):
            value = str((suite_folder / value).resolve())
        resolved[name] = value
    return resolved
