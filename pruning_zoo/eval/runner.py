"""The suite runner: every cell of a suite through lmms-eval's `simple_evaluate`, one result folder per cell.

Finished cells are skipped, so rerunning a command resumes it; a failing cell is recorded with its error and
the sweep goes on; a model or task data that cannot be had stops the sweep at once (SetupError), with nothing
written for it; models are loaded once per sweep and tasks indexed once. lmms-eval's tasks are found and
checked in tasks.py, what a cell records is made in metrics.py, and results.py stores it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pruning_zoo import inputs, plugins
from pruning_zoo.engine.loading import ModelOutline, model_outline
from pruning_zoo.errors import InvalidParameterError, Problems, PruningZooError, SetupError, describe
from pruning_zoo.eval.datasources import TaskData, model_cached, source_problems
from pruning_zoo.eval.distributed import ProcessGroupAccelerator, Ranks
from pruning_zoo.eval.metrics import cell_metrics, task_record, with_compiled_latency
from pruning_zoo.eval.results import (
    RUNNING_FILE,
    TEMPORARY_PREFIX,
    Cell,
    damage,
    output_lock,
    remove_temporaries,
    set_aside,
    status,
    superseded_cells,
    write_cell,
)
from pruning_zoo.eval.suite import Suite, resolve_data_folder, resolve_model, resolve_paths
from pruning_zoo.eval.tasks import (
    check_tasks,
    explain_task_error,
    import_lmms_eval,
    local_task_folders,
    task_data_or_fail,
    task_manager,
    working_directory,
)
from pruning_zoo.plugins import get_strategy
from pruning_zoo.plugins.identity import code_identity
from pruning_zoo.provenance import device_description, git_sha, versions
from pruning_zoo.strategy import params_as_dict
from pruning_zoo.strategy.budget import resolve_budget


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

    def interrupted_message(self) -> str:
        """What an interrupted sweep kept and lost, and how to go on."""
        evaluated = [o for o in self.outcomes if o.status == "finished"]
        skipped = sum(o.status == "skipped" for o in self.outcomes)
        lines = [f"interrupted: {len(evaluated)} cells evaluated in this run and {skipped} finished before are stored "
                 f"in {self.output}; {len(self.cells()) - len(self.outcomes)} of {len(self.cells())} cells are not "
                 "done."]
        if self.current is not None:
            cell = self.current
            lines.append(f"The cell in progress ({cell.task} {cell.strategy} {cell.budget_label}) was discarded: "
                         "nothing of it was written.")
        lines.append("Rerun the same command to resume: finished cells are skipped.")
        return "\n".join(lines)

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
        from pruning_zoo.engine.loading import load_vlm
        from pruning_zoo.eval.lmms_model import PrunedVLM

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
