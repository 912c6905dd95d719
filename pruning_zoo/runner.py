"""The suite runner: every cell of a suite through lmms-eval's `simple_evaluate`, one result folder per cell.

Finished cells are skipped, so rerunning a command resumes it; a failing cell is recorded with its error and
the sweep goes on; a model or task data that cannot be had stops the sweep at once (SetupError), with nothing
written for it; models are loaded once per sweep and tasks indexed once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import socket
import shutil
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pruning_zoo import get_strategy, plugins
from pruning_zoo.distributed import ProcessGroupAccelerator, Ranks
from pruning_zoo import inputs
from pruning_zoo.budget import resolve_budget
from pruning_zoo.datasources import TaskData, model_cached, source_problems, task_data
from pruning_zoo.errors import (InvalidParameterError, OutputBusyError, Problems, PruningZooError, SetupError, closest,
                                describe)
from pruning_zoo.loading import ModelOutline, model_outline
from pruning_zoo.provenance import code_identity, device_description, git_sha, versions
from pruning_zoo.results import (LOCK_FILE, RUNNING_FILE, TEMPORARY_PREFIX, Cell, atomic_write_text, damage,
                                 remove_temporaries, set_aside, status, superseded_cells, write_cell)
from pruning_zoo.strategy import params_as_dict
from pruning_zoo.suite import Suite, builtin_suite_folder

#: Exception names that mean a hub file could not be fetched (huggingface_hub, datasets, requests).
UNREACHABLE = ("LocalEntryNotFoundError", "LocalTokenNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
               "DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "HfHubHTTPError", "Timeout")

HOW_TOKENS = ("Visual tokens per image: before pruning, entering the LLM, and averaged over decoder layers, "
              "from the engine's record of the prefill (means over the task's images).")
HOW_FLOPS = ("Prefill FLOPs per document from the tokens each decoder layer processed (flops.py: multiply-accumulates, "
             "as the papers count them; 2ndm = two MLP matrices as FastV, 3ndm = three as TransPrune); the vision "
             "tower and projector separately, from the crops and patches that ran. Means over documents.")


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


def task_data_or_fail(task_manager, task: str, data_folder: Path | None) -> TaskData:
    try:
        return task_data(task_manager, task, data_folder)
    except Exception as error:  # noqa: BLE001 - a task YAML that lmms-eval cannot read is the user's to fix
        raise PruningZooError(f"task {task!r}: its YAML cannot be read ({describe(error)}); fix the task file or "
                              "choose another task") from None


def plan_problems(strategies: dict, budgets: list, outline: ModelOutline) -> Problems:
    """What keeps each strategy's stages from existing on this model: budgets its images cannot give, layers beyond
    its depth (the decoder's for `plan`, the vision tower's for `vision_layer_params`)."""
    problems = Problems()
    tokens = outline.visual_tokens
    where = f"on {outline.name} ({outline.family}, {outline.num_layers} decoder layers"
    where += f", {tokens} visual tokens per image)" if tokens else ")"
    for budget in budgets:
        if tokens is not None and isinstance(budget, int) and budget > tokens:
            problems.add(InvalidParameterError(
                f"budget {budget} {where}: larger than the {tokens} visual tokens each image has; use at most "
                f"{tokens} (keep-all is the 'none' strategy) or a ratio in (0, 1]"))
    for strategy in strategies.values():
        for name in strategy.vision_layer_params:
            layer, depth = getattr(strategy.params, name), outline.vision_layers
            if depth is not None and not -depth <= layer < depth:
                problems.add(InvalidParameterError(f"{strategy.name}.{name}={layer} {where}: its vision tower has "
                                                   f"{depth} blocks, so give {-depth} to {depth - 1}"))
        for budget in [1.0] if strategy.name == "none" else budgets:
            # Where each image has its own count, the plan is checked on an image with the budget's tokens and more.
            count = tokens if tokens is not None else (budget * 4 if isinstance(budget, int) else 576)
            if isinstance(budget, int):
                budget = min(budget, count)  # a budget too large is reported above, once
            try:
                strategy.plan(resolve_budget(budget, count), count, outline.num_layers)
            except PruningZooError as error:
                problems.add(InvalidParameterError(f"strategy {strategy.name} {where}: {error}"))
    return problems


def output_lock(output: Path, command: str):
    """An exclusive lock on `output` for this process (released when it exits, however it exits); another
    process holding it is an error that says which."""
    import filelock

    lock = filelock.FileLock(output / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = json.loads((output / RUNNING_FILE).read_text(encoding="utf-8"))
            who = f" (process {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = ""
        raise OutputBusyError(f"another pruning-zoo run is writing to {output}{who}; wait for it to finish, or give "
                              "this run another --output") from None
    atomic_write_text(output / RUNNING_FILE, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}) + "\n")
    return lock


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


@dataclasses.dataclass
class CellOutcome:
    cell: Cell
    folder: Path
    status: str  # finished, skipped or failed
    error: str | None = None


class Sweep:
    """Runs the cells of one resolved suite into `output`."""

    def __init__(self, suite: Suite, output: Path, suite_folder: Path | None = None, device: str | None = None,
                 dtype: str = "auto", command: str = "", on_cell: Callable[[Cell, str], None] | None = None,
                 compiled_latency: bool | None = None):
        import torch

        self.ranks = Ranks()
        self.suite, self.output, self.suite_folder = suite, output.resolve(), suite_folder
        self.data_folder = resolve_data_folder(suite.data, suite_folder)
        #: Task -> where its documents come from, resolved when the sweep starts.
        self.task_data: dict[str, TaskData] = {}
        self.device = torch.device(device or self.ranks.default_device())
        if self.device.type == "cuda" and self.device.index is None and self.ranks.world > 1:
            self.device = torch.device("cuda", self.ranks.local)
        self.dtype, self.command = dtype, command
        #: Time each cell in the compiled mode too (by default on a GPU, where it is the leaderboard's latency).
        self.compiled_latency = self.device.type == "cuda" if compiled_latency is None else compiled_latency
        self.on_cell = on_cell or (lambda cell, state: None)
        #: Read once: the code that runs is the code imported at the start, whatever changes on disk later.
        self.provenance = {"git_sha": git_sha(), "versions": versions(), "device": device_description(self.device)}
        registry = plugins.strategies()
        #: Strategy -> which code it is (its distribution, version, source hash): recorded in every cell.
        self.strategy_code = {name: code_identity(registry.get(name), registry.entry(name).source)
                              for name in suite.strategies if name in registry}
        #: Finished folders of this sweep's cells made by other strategy code, found when the sweep starts.
        self.superseded: list[Path] = []
        #: Damaged cell folders renamed aside during this run (new path, what was wrong); their cells run again.
        self.set_aside: list[tuple[Path, str]] = []
        self._models: dict[str, Any] = {}
        #: The cells of the current `run` so far, and the one being evaluated: what an interrupted sweep reports.
        self.outcomes: list[CellOutcome] = []
        self.current: Cell | None = None
        self.prepared = False

    def cells(self) -> list[Cell]:
        return [
            Cell(model=model, task=task, strategy=strategy, params=dict(self.suite.strategies[strategy]),
                 budget=budget, limit=self.suite.limit, batch_size=self.suite.batch_size, dtype=self.dtype,
                 device_type=self.device.type,
                 strategy_code=self.strategy_code.get(strategy, {}).get("source_sha256"))
            for model, task, strategy, budget in self.suite.cells()
        ]

    def prepare(self) -> None:
        """Every check the sweep makes before it writes or loads anything, with one error naming every problem:
        the output folder, task folders and names, the tasks' data and the models (where they can be had offline),
        each model's config, and each strategy built and planned on each model's depth and visual tokens. A dry
        run stops here; `run` starts with it."""
        import_lmms_eval()
        from lmms_eval.tasks import TaskManager

        problems = Problems()
        problems.check(inputs.output_folder, self.output, "--output")
        folders = problems.check(local_task_folders, self.suite_folder, self.suite.task_paths)
        self.task_manager = task_manager(TaskManager, folders or local_task_folders(self.suite_folder, []),
                                         self.suite.tasks)
        known = [task for task in self.suite.tasks if problems.check(check_tasks, self.task_manager, [task]) is None]
        self.task_data = {}
        for task in known:
            data = problems.check(task_data_or_fail, self.task_manager, task, self.data_folder)
            if data is not None:
                self.task_data[task] = data
        models = [resolve_model(m, self.suite_folder) for m in self.suite.models]
        for problem in source_problems(list(self.task_data.values()), models, self.data_folder):
            problems.add(SetupError(problem))
        built = {}
        for name, params in self.suite.strategies.items():
            strategy = problems.check(get_strategy, name, **resolve_paths(params, self.suite_folder))
            if strategy is not None:
                built[name] = strategy
        for given, model in zip(self.suite.models, models):
            if not (Path(model).is_dir() or model_cached(model)):
                continue  # unreachable: reported with the sources above
            outline = problems.check(model_outline, model, given)
            if outline is not None:
                problems.found += plan_problems(built, self.suite.budgets, outline).found
        problems.raise_if_any("the sweep cannot start")
        self.prepared = True

    def run(self) -> list[CellOutcome]:
        if not self.prepared:
            self.prepare()
        self.ranks.start(self.device)
        if self.ranks.main:
            self.output.mkdir(parents=True, exist_ok=True)
            self.lock = output_lock(self.output, self.command)
        try:
            return self._run_cells()
        finally:
            if self.ranks.main:  # who-holds-it goes first: once released, the file may be another run's
                (self.output / RUNNING_FILE).unlink(missing_ok=True)
                self.lock.release()

    def _run_cells(self) -> list[CellOutcome]:
        if self.ranks.main:
            remove_temporaries(self.output)
            self.superseded = superseded_cells(self.output, self.cells())
        self.ranks.barrier()
        self.outcomes = outcomes = []
        for cell in self.cells():
            folder = self.output / cell.folder_name
            state = status(folder)
            if self.ranks.main and state == "finished" and (problem := damage(folder)) is not None:
                # A damaged result is never trusted nor deleted: renamed aside, its cell evaluated again.
                self.set_aside.append((set_aside(folder), problem))
                state = "missing"
            if self.ranks.broadcast(state) == "finished":  # rank 0's view: every rank skips alike
                outcomes.append(CellOutcome(cell, folder, "skipped"))
                self.on_cell(cell, "skipped")
                continue
            self.current = cell
            self.on_cell(cell, "running")
            try:
                outcome = self.run_cell(cell)
            except SetupError as error:
                self.ranks.finish()
                raise SetupError(f"{error}\n{self.stopped_at(cell)}") from None
            self.current = None
            outcomes.append(outcome)
            self.on_cell(cell, outcome.status)
        self.ranks.finish()
        return outcomes

    def stopped_at(self, cell: Cell) -> str:
        """What a sweep stopped at `cell` leaves: which cells are stored and how to go on."""
        stored = sum(outcome.status != "failed" for outcome in self.outcomes)
        return (f"The sweep stopped at {cell.task} {cell.strategy} {cell.budget_label} (cell {len(self.outcomes) + 1} of "
                f"{len(self.cells())}); nothing was written for it or the cells after it, and the {stored} finished "
                f"cells in {self.output} are kept. Fix this and rerun the same command: finished cells are skipped.")

    def run_cell(self, cell: Cell) -> CellOutcome:
        """Evaluate one cell on every rank; rank 0 writes it. Every rank returns rank 0's outcome."""
        #: What the task's own code writes while it runs (submission files): kept with a finished cell.
        self.artefacts = self.output / f"{TEMPORARY_PREFIX}files-{uuid.uuid4().hex[:8]}-rank{self.ranks.rank}"
        try:
            return self._run_cell(cell)
        finally:
            shutil.rmtree(self.artefacts, ignore_errors=True)

    def _run_cell(self, cell: Cell) -> CellOutcome:
        config = {"cell": cell.as_dict(), "command": self.command, **self.provenance,
                  "strategy_code": self.strategy_code.get(cell.strategy), "processes": self.ranks.world,
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        seconds = Stopwatch()
        lm, results, failure = None, None, None
        try:
            lm = self.model_for(cell)
        except Exception as error:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
            failure = failure_record(error)
        # Evaluate only when every rank could build its model: a rank missing from lmms-eval's collectives
        # would leave the others waiting.
        ready = [f for f in self.ranks.gather(failure) if f is not None]
        raise_setup_failure(ready)
        if not ready:
            try:
                results = self.evaluate(cell, lm)
                if lm.errors:  # in a multi-process run the model records batch errors instead of raising
                    raise PruningZooError(lm.errors[0])
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001
                failure = failure_record(error)
        seconds.lap("evaluate")
        # Each process's evaluation split into lmms-eval's own work, preparing inputs and generating: how
        # evenly the processes share a cell, and what is left serial.
        process_seconds = {"evaluate": seconds.laps["evaluate"],
                           **{name: round(value, 3) for name, value in (lm.seconds if lm is not None else {}).items()}}
        shared = self.ranks.gather({"failure": failure, "seconds": process_seconds,
                                    "documents": lm.document_measurements if lm is not None else {},
                                    "timings": lm.batch_timings if lm is not None else [],
                                    "latency_example": lm.latency_example if lm is not None and self.compiled_latency else None})
        failures = [part["failure"] for part in shared if part["failure"] is not None]
        raise_setup_failure(failures)  # on every rank alike, before anything is written
        # On a GPU the leaderboard's latency is the compiled mode's. The last rank times it while rank 0 turns
        # the results into metrics, so that neither waits for the other's serial work (one rank does both). All
        # ranks time the same document: the task's first one that any of them answered.
        compiled, timed = None, not failures and self.compiled_latency  # alike on every rank
        if timed and self.ranks.rank == self.ranks.world - 1:
            examples = [part["latency_example"] for part in shared if part["latency_example"] is not None]
            try:
                compiled = lm.compiled_latency(min(examples, key=lambda example: example[0]) if examples else None)
            except Exception as error:  # noqa: BLE001 - a measurement that breaks must not lose the evaluation
                compiled = {"error": describe(error)}
            seconds.lap("compiled_latency")
        outcome, metrics, samples = None, None, None
        if self.ranks.main and not failures:
            for part in shared[1:]:  # every rank's documents and batches into rank 0's model
                lm.document_measurements.update(part["documents"])
                lm.batch_timings.extend(part["timings"])
            try:
                metrics, samples = cell_metrics(cell, results, lm, self.provenance["device"])
            except Exception as error:  # noqa: BLE001 - rank 0 must still meet the others below
                failures = [failure_record(error)]
            seconds.lap("metrics")
        if timed and self.ranks.world > 1:
            compiled, seconds.laps["compiled_latency"] = self.ranks.gather((compiled, seconds.laps.get("compiled_latency")))[-1]
        if self.ranks.main:
            config["seconds"] = {**seconds.laps, "total": seconds.total(),
                                 "processes": [part["seconds"] for part in shared]}
            if failures:
                folder = write_cell(self.output, cell, config, error=failures[0])
                outcome = CellOutcome(cell, folder, "failed", failures[0]["error"])
            else:
                if compiled is not None:
                    metrics["latency"] = with_compiled_latency(metrics["latency"], compiled)
                config["strategy_params"] = params_as_dict(lm.strategy.params)
                config["model_path"] = lm.loaded.name
                config["lmms_eval"] = {key: value for key, value in (results.get("config") or {}).items() if key != "model"}
                config["task"] = task_record(self.task_data.get(cell.task), results, cell.task)
                folder = write_cell(self.output, cell, config, metrics=metrics, samples=samples,
                                    files=self.artefacts / "submissions")
                outcome = CellOutcome(cell, folder, "finished")
        return self.ranks.broadcast(outcome)

    def model_for(self, cell: Cell):
        from pruning_zoo.lmms_model import PrunedVLM
        from pruning_zoo.loading import load_vlm

        if cell.model not in self._models:
            try:
                self._models[cell.model] = load_vlm(resolve_model(cell.model, self.suite_folder), str(self.device), self.dtype)
            except PruningZooError as error:  # every cell of this model would fail alike
                raise SetupError(str(error)) from None
            except Exception as error:
                raise SetupError(f"cannot load model {cell.model!r}: {describe(error)}") from error
        lm = PrunedVLM(loaded=self._models[cell.model], strategy=cell.strategy, budget=cell.budget,
                       batch_size=cell.batch_size, **resolve_paths(cell.params, self.suite_folder))
        if self.ranks.world > 1:
            lm.accelerator = ProcessGroupAccelerator()
        return lm

    def evaluate(self, cell: Cell, lm) -> dict:
        from lmms_eval.evaluator import simple_evaluate

        yaml_path = self.task_manager.task_index[cell.task].get("yaml_path")
        data = self.task_data.get(cell.task)
        # A local copy of a hub dataset is found from the data folder; a task over its own files from its YAML's.
        folder = self.data_folder if data is not None and data.local is not None else (
            Path(yaml_path).parent if isinstance(yaml_path, str) else None)
        # Files a task's aggregation writes (submission files) go to `submissions/` of the cell's folder.
        options = argparse.Namespace(output_path=str(self.artefacts), process_with_media=True)
        try:
            with working_directory(folder):
                results = simple_evaluate(model=lm, tasks=[cell.task], limit=cell.limit, batch_size=cell.batch_size,
                                          task_manager=self.task_manager, log_samples=True, verbosity="WARNING",
                                          cli_args=options)
        except PruningZooError:
            raise
        except Exception as error:
            message = explain_task_error(cell.task, yaml_path, error)
            # A dataset that cannot be reached fails every cell of its task alike: stop, as for a model.
            raise (SetupError if "could not load its dataset" in message else PruningZooError)(message) from error
        if results is None and self.ranks.main:  # lmms-eval returns results on rank 0 only
            raise PruningZooError(f"lmms-eval returned no results for task {cell.task!r}")
        return results


def task_record(data: TaskData | None, results: dict, task: str) -> dict:
    """Which task definition ran and on what data: lmms-eval's own YAML and functions, the dataset and its copy."""
    config = (results.get("configs") or {}).get(task) or {}
    record = {"name": task, "yaml_path": data.yaml_path if data else None,
              "dataset_path": data.dataset_path if data else None, "dataset_name": data.dataset_name if data else None,
              "split": data.split if data else None, "local_copy": str(data.local) if data and data.local else None,
              "metrics": [entry.get("metric") for entry in config.get("metric_list") or []]}
    record["functions"] = dict(data.hooks) if data else {}
    return record


class Stopwatch:
    """Seconds spent in each step of a cell, kept in its config.json: where a sweep's time goes."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float | None] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def failure_record(error: BaseException) -> dict:
    return {"error": describe(error), "type": type(error).__name__, "traceback": traceback.format_exc(),
            "setup": isinstance(error, SetupError)}


def raise_setup_failure(failures: list[dict]) -> None:
    """A SetupError of any process stops the sweep on every process (they all see the same gathered failures)."""
    for failure in failures:
        if failure.get("setup"):
            raise SetupError(failure["error"])


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def task_scores(task_results: dict) -> dict[str, float | None]:
    """lmms-eval's 'metric,filter' entries without standard errors, by metric name."""
    scores = {}
    for key, value in task_results.items():
        metric, comma, _ = key.partition(",")
        if comma and "_stderr" not in metric and isinstance(value, (int, float)):
            scores.setdefault(metric, value)
    return scores


#: Batches whose timings are left out of the medians: the first one warms kernels and allocators.
WARMUP_BATCHES = 1


def task_manager(manager_class, folders: list[Path], tasks: list[str]):
    """lmms-eval's task index over our local task folders alone when they hold every task of the sweep: indexing
    lmms-eval's hundreds of built-in task YAMLs takes many seconds in every process of a sweep. Else the full one."""
    paths = [str(p) for p in folders]
    if paths:
        local = manager_class("WARNING", include_path=paths, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return manager_class("WARNING", include_path=paths or None)


def latency_summary(timings: list[dict], device: str, clock_kind: str, batch_size: int) -> dict:
    timed = timings[WARMUP_BATCHES:] if len(timings) > WARMUP_BATCHES else timings
    shares = [t["selection_ms"] / t["time_to_first_token_ms"] for t in timed if t["time_to_first_token_ms"]]
    return {
        "device": device, "clock": clock_kind, "mode": "eager", "batch_size": batch_size, "batches": len(timings),
        "timed_batches": len(timed),
        "time_to_first_token_ms": _median([t["time_to_first_token_ms"] for t in timed]),
        "selection_ms": _median([t["selection_ms"] for t in timed]),
        "selection_share_of_ttft": _median(shares),
        "decode_ms_per_token": _median([t["decode_ms_per_token"] for t in timed]),
        "peak_memory_bytes": max((t["peak_memory_bytes"] for t in timings if t["peak_memory_bytes"] is not None), default=None),
        "how": (f"Per batch of up to {batch_size} documents, measured with {clock_kind}, eager transformers: time to "
                "first token from the generate() call to the first new token on the host (vision encoder, selection "
                "and prefill; the processor's CPU preprocessing excluded); selection = the engine's scoring, selecting "
                "and gathering; decode = time per further token. Medians over batches, the first "
                f"{WARMUP_BATCHES} left out as warm-up when there are more; peak memory = the largest "
                "torch.cuda.max_memory_allocated of a batch (GPU only)."),
    }


def cell_metrics(cell: Cell, results: dict, lm, device: str) -> tuple[dict, list[dict]]:
    """metrics.json and the per-sample records of one evaluated cell."""
    task_results = results["results"].get(cell.task) or next(iter(results["results"].values()))
    scores = task_scores(task_results)
    samples = []
    for task, rows in sorted((results.get("samples") or {}).items()):
        for row in rows:
            doc = row.get("doc") or {}
            measured = lm.document_measurements.get((task, row["doc_id"]), {})
            prediction = row.get("filtered_resps", [None])[0]
            samples.append({
                "task": task, "doc_id": row["doc_id"], "id": doc.get("id") if isinstance(doc, dict) else None,
                "target": row.get("target"), "prediction": prediction,
                **{name: row[name] for name in scores if isinstance(row.get(name), (int, float))},
                **measured,
            })
    measured = list(lm.document_measurements.values())
    with_images = [m for m in measured if m["images"]]
    images = sum(m["images"] for m in with_images) or None
    metrics = {
        "task": cell.task,
        "documents": len(samples),
        "primary_metric": next(iter(scores), None),
        "scores": scores,
        "visual_tokens": {
            "per_image": sum(m["visual_tokens"] for m in with_images) / images if images else None,
            "entering_llm": sum(m["entering_llm"] for m in with_images) / images if images else None,
            "average_per_layer": sum(m["average_per_layer"] for m in with_images) / images if images else None,
            "budget_counts": lm.strategy.budget_meaning.value,
            "how": HOW_TOKENS,
        },
        "flops": {
            "llm_prefill_2ndm": _mean([m["llm_prefill_flops_2ndm"] for m in measured]),
            "llm_prefill_3ndm": _mean([m["llm_prefill_flops_3ndm"] for m in measured]),
            "vision": _mean([m["vision_flops"] for m in measured]),
            "how": HOW_FLOPS,
        },
        "evidence_recall": _mean([m["evidence_recall"] for m in measured]),
        "latency": latency_summary(lm.batch_timings, device, lm.clock_kind, cell.batch_size),
    }
    return metrics, samples


def with_compiled_latency(eager: dict, compiled: dict) -> dict:
    """The latency summary with the compiled mode's time to first token and selection in front and the eager
    ones kept under `eager` (decode time and peak memory stay the evaluation's own)."""
    if "error" in compiled:
        return {**eager, "compiled_error": compiled["error"]}
    kept = {key: eager[key] for key in ("time_to_first_token_ms", "selection_ms", "selection_share_of_ttft")}
    fused = f", their layers fused by torch.compile ({compiled['fusion']})" if compiled.get("fusion") else ""
    return {
        # Fused and unfused compiled latencies differ: the mode names the fusion, so no table mixes them.
        **eager, **{key: compiled[key] for key in kept}, "eager": kept,
        "mode": f"compiled ({compiled['fusion']})" if compiled.get("fusion") else "compiled",
        "eager_segments": compiled["eager_segments"], "fusion": compiled.get("fusion"),
        "how": (f"Time to first token and selection: the compiled mode (the prefill as CUDA-graph segments, "
                f"pruning_zoo.segmented{fused}; on a CPU the segments run eagerly) on {eager['batch_size']} copies of the "
                f"task's first document, medians of {compiled['repeats']} after warm-up, with the evaluation's clock. "
                + eager["how"].replace("Per batch", "`eager`, and decode and memory: per batch")),
    }


def quiet_progress_output() -> None:
    """lmms-eval logs every step at INFO through loguru, and transformers draws a bar per model load; the sweep
    shows one progress bar of its own instead (warnings still print)."""
    import transformers
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    transformers.utils.logging.disable_progress_bar()
