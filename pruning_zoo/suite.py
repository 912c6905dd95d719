"""Suites: which tasks, models, strategies and budgets to sweep, read from YAML files under suites/."""

from __future__ import annotations

import importlib.resources
import itertools
import os
from pathlib import Path
from typing import Any

import pydantic
import yaml

from pruning_zoo import plugins
from pruning_zoo.budget import Budget, check_budget
from pruning_zoo.errors import InvalidParameterError, PruningZooError, UnknownNameError
from pruning_zoo.strategy import build_params


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
    budgets: list[Budget] = pydantic.Field(min_length=1)
    #: At most this many documents per task (None: all).
    limit: int | None = pydantic.Field(default=None, ge=1)
    batch_size: int = pydantic.Field(default=1, ge=1)

    @pydantic.field_validator("budgets")
    @classmethod
    def _budgets_are_valid(cls, budgets: list[Budget]) -> list[Budget]:
        for budget in budgets:
            check_budget(budget)
        return budgets

    def check_strategies(self) -> None:
        """Every strategy is registered and its parameters validate (raises a PruningZooError)."""
        registry = plugins.strategies()
        for name, params in self.strategies.items():
            if name not in registry and os.environ.get(plugins.PLUGINS_ENV) is not None:
                raise UnknownNameError("strategy", name, registry.names()).with_hint(
                    f"{plugins.PLUGINS_ENV}={os.environ[plugins.PLUGINS_ENV]!r} loads only those plugins: choose "
                    "strategies from them with --strategies, or unset it")
            build_params(name, registry.get(name).Params, params)

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
    path = Path(name_or_path)
    if not (path.suffix in {".yaml", ".yml"} and path.exists()):
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
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PruningZooError(f"suite file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise PruningZooError(f"suite file {path} must hold a mapping of fields (tasks, models, ...)")
    data.setdefault("name", path.stem)
    return validate_suite(data, origin=str(path), check_strategies=check_strategies)


def validate_suite(data: dict[str, Any], origin: str, check_strategies: bool = True) -> Suite:
    try:
        suite = Suite(**data)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            f" (got {problem.get('input')!r})"
            for problem in error.errors()
        )
        allowed = ", ".join(Suite.model_fields)
        raise InvalidParameterError(f"suite {origin} is invalid: {problems}. Suite fields: {allowed}") from None
    if check_strategies:
        suite.check_strategies()
    return suite
