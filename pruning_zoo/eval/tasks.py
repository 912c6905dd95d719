"""lmms-eval's tasks: importing lmms-eval, the folders of local task YAMLs and lmms-eval's index over them, each
task's name and data checked, a task run from its data's folder, a task's failure explained, and lmms-eval's
logging quietened for the sweep's own progress bar."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pruning_zoo.errors import PruningZooError, closest, describe
from pruning_zoo.eval.datasources import TaskData, task_data
from pruning_zoo.eval.suite import builtin_suite_folder

#: Exception names that mean a hub file could not be fetched (huggingface_hub, datasets, requests).
UNREACHABLE = ("LocalEntryNotFoundError", "LocalTokenNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
               "DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "HfHubHTTPError", "Timeout")


def import_lmms_eval() -> None:
    try:
        importlib.import_module("lmms_eval.evaluator")
    except ImportError as error:
        raise PruningZooError(
            f"`pruning-zoo run` evaluates through lmms-eval, which is not importable here ({error}); install it with "
            "`pip install -e '.[eval]'` (it pulls torchvision and a matching full torch)"
        ) from None


def local_task_folders(suite_folder: Path | None, task_paths: list[str]) -> list[Path]:
    """Folders of task YAMLs: every sub-folder of the built-in suites that holds one, and the suite's own
    `task_paths` (relative to the suite file)."""
    folders = [path for path in sorted(builtin_suite_folder().iterdir()) if path.is_dir() and any(path.glob("*.yaml"))]
    for entry in task_paths:
        path = Path(entry)
        if not path.is_absolute() and suite_folder is not None and (suite_folder / path).is_dir():
            path = suite_folder / path
        if not path.is_dir():
            raise PruningZooError(f"task path {entry} is not a folder; give folders that hold lmms-eval task YAMLs")
        folders.append(path.resolve())
    return folders


def task_manager(manager_class, folders: list[Path], tasks: list[str]):
    """lmms-eval's task index over our local task folders alone when they hold every task of the sweep: indexing
    lmms-eval's hundreds of built-in task YAMLs takes many seconds in every process of a sweep. Else the full one."""
    paths = [str(p) for p in folders]
    if paths:
        local = manager_class("WARNING", include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return manager_class("WARNING", include_path=paths or None)


def task_data_or_fail(task_manager, task: str, data_folder: Path | None) -> TaskData:
    try:
        return task_data(task_manager, task, data_folder)
    except Exception as error:  # noqa: BLE001 - a task YAML that lmms-eval cannot read is the user's to fix
        raise PruningZooError(f"task {task!r}: its YAML cannot be read ({describe(error)}); fix the task file or "
                              "choose another task") from None


def check_tasks(task_manager, tasks: list[str]) -> None:
    known = task_manager.all_tasks
    for task in tasks:
        if task not in known:
            suggestion = closest(task, known)
            hint = f"; did you mean {suggestion!r}?" if suggestion else ""
            raise PruningZooError(
                f"unknown task {task!r}{hint} Tasks are lmms-eval's names (`lmms-eval --tasks list`) or local task "
                "YAMLs in a folder passed with --task-path"
            )


@contextlib.contextmanager
def working_directory(folder: Path | None) -> Iterator[None]:
    """lmms-eval resolves a local task's `data_files`, and datasets a dataset id, against the working directory: run
    a task from its data's folder."""
    previous = os.getcwd()
    if folder is not None:
        os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def root_cause(error: BaseException) -> BaseException:
    """The innermost error: through tenacity's RetryError and exception chains."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        attempt = getattr(error, "last_attempt", None)
        if attempt is not None and attempt.exception() is not None:
            error = attempt.exception()
        elif error.__cause__ is not None:
            error = error.__cause__
        elif error.__context__ is not None and not error.__suppress_context__:
            error = error.__context__
        else:
            break
    return error


def explain_task_error(task: str, yaml_path: str | None, error: BaseException) -> str:
    cause = root_cause(error)
    text = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    names = {kind.__name__ for kind in type(cause).__mro__}
    if names & set(UNREACHABLE) or any(word in str(cause).lower() for word in ("offline", "connection", "resolve host")):
        return (
            f"task {task!r} could not load its dataset from the Hugging Face hub ({text}); this machine cannot reach "
            f"it. Copy the hub cache (HF_HOME) from a machine with network and set HF_HUB_OFFLINE=1, or write a local "
            f"task YAML (dataset_path: parquet or json, with data_files) next to the data and pass its folder with "
            f"--task-path FOLDER (or `task_paths:` in the suite). The task is defined in {yaml_path}"
        )
    return f"task {task!r} failed: {text}"


def quiet_progress_output() -> None:
    """lmms-eval logs every step at INFO through loguru, and transformers draws a bar per model load; the sweep
    shows one progress bar of its own instead (warnings still print)."""
    import transformers
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    transformers.utils.logging.disable_progress_bar()
