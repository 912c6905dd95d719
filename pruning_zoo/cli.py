"""The `pruning-zoo` command line.

Only typer, rich and pruning-zoo's pure-Python modules are imported here; each command imports what it needs
(torch, transformers, lmms-eval) when it runs, so `--help` answers at once and `list` never loads a model library.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pruning_zoo import get_strategy
from pruning_zoo.budget import MAX_BUDGET, parse_budget
from pruning_zoo import inputs
from pruning_zoo.errors import InvalidParameterError, Problems, PruningZooError, describe

if TYPE_CHECKING:
    from pruning_zoo.suite import Suite

app = typer.Typer(
    name="pruning-zoo",
    help="Compare visual-token pruning strategies for vision-language models on equal terms.\n\n"
    "Start with `pruning-zoo list` to see the strategies, model families and suites installed, then "
    "`pruning-zoo run --suite NAME --dry-run` to see what a sweep would evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: More data-loader processes than any machine runs usefully: a larger count is a typo that would fork thousands.
MAX_WORKERS = 256


def not_nan(value: float, option: str) -> float:
    """typer's range check lets NaN through (every comparison with it is false)."""
    if value != value:
        raise typer.BadParameter(f"{value} is not a number", param_hint=option)
    return value


def finite(value: float, option: str) -> float:
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number", param_hint=option)
    return value


#: What `run --dtype` takes ('auto': bfloat16 on a GPU, float32 on a CPU).
RUN_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Shown in `list` to make each strategy's plan concrete: LLaVA-1.5-7B's 576 visual tokens and 32 layers.
REFERENCE_BUDGET, REFERENCE_TOKENS, REFERENCE_LAYERS = 64, 576, 32


DEBUG_ENV = "PRUNING_ZOO_DEBUG"
_debug = False


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of any error (or set {DEBUG_ENV}=1).")] = False,
) -> None:
    global _debug
    _debug = debug


def debugging() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "") not in {"", "0"}


def print_error(text: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt while a long command runs, so that it says what it finished and
    how to go on; also where the shell started it with SIGINT ignored (a background job of a script)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def user_errors():
    """Every error as one clear message, without a traceback (unless debugging): pruning-zoo's own errors with
    their exit code (2: the input is wrong, 1: something it needs failed), any other as a fault of ours (1)."""
    try:
        yield
    except (typer.Exit, typer.Abort, click.ClickException, KeyboardInterrupt):
        raise
    except PruningZooError as error:
        if debugging():
            raise
        print_error(str(error))
        raise typer.Exit(code=error.exit_code) from None
    except Exception as error:  # noqa: BLE001 - the last net: a message, never a bare traceback
        if debugging():
            raise
        print_error(f"{describe(error)}\nThis is a fault of pruning-zoo, not of your input: rerun with --debug "
                    f"(or {DEBUG_ENV}=1) for the traceback, and report it. Finished results are kept.")
        raise typer.Exit(code=1) from None


def fitted(title: str, headers: list[str], rows: list[list[str]], console: Console):
    """A table whose columns are at least as wide as their longest word, where that fits the terminal; else one
    block per row (its first cell, then each other column as `header  value`). No word is broken across lines."""
    columns = [[header, *(row[index] for row in rows)] for index, header in enumerate(headers)]
    shortest = [max(len(word) for text in column for word in [*text.split(), ""]) for column in columns]
    widest = [max(len(text) for text in column) for column in columns]
    # No outer border or edge padding: each column takes 2 of padding and 1 of separator, less 3 at the edges.
    spare = console.width - (sum(shortest) + 3 * len(headers) - 3)
    if spare >= 0:
        # rich would narrow the widest columns first, below their longest word: share out the spare width here.
        wants = [full - least for full, least in zip(widest, shortest)]
        share = min(1.0, spare / sum(wants)) if sum(wants) else 0.0
        table = Table(title=title, show_edge=False, pad_edge=False)
        for header, least, want in zip(headers, shortest, wants):
            table.add_column(header, width=least + int(want * share), overflow="fold")
        for row in rows:
            table.add_row(*row)
        return table
    blocks = Table(title=title, show_header=False, box=None, padding=(0, 1), expand=True)
    blocks.add_column(overflow="fold", no_wrap=True)
    blocks.add_column(overflow="fold", ratio=1)
    for row in rows:
        blocks.add_row(f"[bold]{escape(row[0])}[/]", "")
        for header, value in zip(headers[1:], row[1:]):
            blocks.add_row(f"  {header}", value)
    return blocks


@app.command("list")
def list_command() -> None:
    """Show the installed strategies (with their source distribution, stages and parameters), the model
    families the engine supports, and the suites that `run` accepts."""
    from pruning_zoo import plugins
    from pruning_zoo.strategy import describe_field, param_schema
    from pruning_zoo.suite import builtin_suite_files, load_suite

    with user_errors():
        console = Console()
        strategies, parameters = [], []
        for entry in plugins.strategies():
            strategy_class = entry.value
            try:
                stages = strategy_class().plan(REFERENCE_BUDGET, REFERENCE_TOKENS, REFERENCE_LAYERS)
                stage_text = "; ".join(str(stage) for stage in stages) or "(keeps every token)"
            except PruningZooError as error:
                stage_text = f"(cannot plan: {error})"
            strategies.append([entry.name, strategy_class.budget_meaning.value.replace("_", " "), stage_text,
                               str(entry.source)])
            for name, schema in param_schema(strategy_class.Params).items():
                parameters.append([f"{entry.name}.{name}", repr(schema.get("default")),
                                   describe_field(strategy_class.Params, name, default=False)])
        console.print(fitted(f"Strategies (stages for {REFERENCE_BUDGET} of {REFERENCE_TOKENS} visual tokens and "
                             f"{REFERENCE_LAYERS} decoder layers, numbered from 0)",
                             ["name", "budget counts", "stages", "from"], strategies, console))
        console.print(fitted("Strategy parameters (`--param STRATEGY.NAME=VALUE`)", ["parameter", "default", "accepts"],
                             parameters, console))

        families = [[entry.name, entry.value.model_class, ", ".join(entry.value.model_types), entry.value.description,
                     str(entry.source)] for entry in plugins.model_families()]
        console.print(fitted("Model families", ["name", "transformers class", "config model_type", "description", "from"],
                             families, console))

        suites = []
        for name, path in sorted(builtin_suite_files().items()):
            try:
                suite = load_suite(str(path))
            except PruningZooError as error:  # e.g. a strategy left out by PRUNING_ZOO_PLUGINS
                suites.append([name, f"(unusable: {error})", "", "", ""])
                continue
            suites.append([name, ", ".join(suite.tasks), ", ".join(suite.models), ", ".join(suite.strategies),
                           ", ".join(map(str, suite.budgets))])
        console.print(fitted("Suites (`pruning-zoo run --suite NAME`)", ["name", "tasks", "models", "strategies", "budgets"],
                             suites, console))


def parse_param_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """['fastv.k=3', 'random.seed=1'] -> {'fastv': {'k': '3'}, 'random': {'seed': '1'}}."""
    overrides: dict[str, dict[str, str]] = {}
    for item in items:
        target, equals, value = item.partition("=")
        strategy, dot, key = target.partition(".")
        if not (equals and dot and strategy and key):
            raise InvalidParameterError(
                f"--param {item!r} is not STRATEGY.PARAMETER=VALUE; for example --param fastv.k=3"
            )
        overrides.setdefault(strategy.strip(), {})[key.strip()] = value.strip()
    return overrides


def apply_overrides(
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
    from pruning_zoo.suite import validate_suite

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


@app.command()
def run(
    suite: Annotated[str, typer.Option(help="Built-in suite name (see `pruning-zoo list`) or a suite YAML file.")],
    model: Annotated[
        list[str] | None, typer.Option(help="Model to evaluate (hub id or local path); repeat for several.")
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated task names, replacing the suite's.")] = None,
    task_path: Annotated[
        list[str] | None, typer.Option(help="Folder of lmms-eval task YAMLs over local data; repeatable.")
    ] = None,
    data: Annotated[Path | None, typer.Option(
        help="Folder of local copies of the tasks' hub datasets, each as DATA/OWNER/NAME (e.g. DATA/lmms-lab-encoder/GQA, "
             "as `hf download OWNER/NAME --repo-type dataset --local-dir DATA/OWNER/NAME` makes it).")] = None,
    strategies: Annotated[
        str | None, typer.Option(help="Comma-separated strategy names, replacing the suite's (e.g. none,fastv).")
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(help="Comma-separated budgets: token counts per image (64) or ratios in (0, 1] (0.25)."),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Strategy parameter, STRATEGY.NAME=VALUE (e.g. fastv.k=3); repeatable.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many documents per task (the first ones).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Prompts per forward pass.")] = None,
    output: Annotated[Path, typer.Option(help="Folder for results, one sub-folder per cell.")] = Path("results"),
    device: Annotated[str | None, typer.Option(help="cuda, cuda:N or cpu (default: cuda when there is one).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")] = "auto",
    dry_run: Annotated[bool, typer.Option(help="Validate everything and print the sweep's cells; run nothing.")] = False,
    compiled_latency: Annotated[bool | None, typer.Option(
        help="Also time each cell's first document in the compiled mode (the latency column; CUDA graphs). "
             "Default: on a GPU only (on a CPU its segments run eagerly).")] = None,
) -> None:
    """Evaluate a suite's strategies across its tasks, models and budgets through lmms-eval, one result folder
    per cell. Finished cells are skipped: rerun the same command to resume or to retry failed cells."""
    from pruning_zoo.suite import load_suite

    with user_errors():
        console = Console()
        problems = Problems()  # every option checked, every problem named at once
        chosen_device = problems.check(inputs.device, device)
        problems.check(inputs.dtype, dtype, RUN_DTYPES)
        problems.check(inputs.output_folder, output, "--output")
        resolved = problems.check(lambda: apply_overrides(
            load_suite(suite, check_strategies=False), model, inputs.name_list(tasks, "--tasks"),
            inputs.name_list(strategies, "--strategies"), inputs.name_list(budgets, "--budgets"), param or [], limit,
            batch_size, task_path, data))
        problems.raise_if_any("the options are invalid")
        from pruning_zoo.runner import Sweep
        from pruning_zoo.suite import suite_file

        sweep = Sweep(resolved, output, suite_folder=suite_file(suite).parent.resolve(), device=chosen_device,
                      dtype=dtype, command="pruning-zoo " + " ".join(sys.argv[1:]), compiled_latency=compiled_latency)
        if dry_run:
            source = f"; datasets from local copies in {resolved.data}" if resolved.data else ""
            table = Table(title=f"Suite {resolved.name}: {len(resolved.cells())} cells -> {output}{source}")
            for column in ("model", "task", "strategy", "budget", "parameters"):
                table.add_column(column, overflow="fold")
            for model_name, task, strategy, budget in resolved.cells():
                params = ", ".join(f"{k}={v}" for k, v in resolved.strategies[strategy].items())
                table.add_row(model_name, task, strategy, "all" if strategy == "none" else str(budget), params or "defaults")
            console.print(table)
            sweep.prepare()  # after the table: a suite that cannot run here still shows what it would evaluate
            console.print(f"checked: the output folder, {len(resolved.tasks)} tasks and their data, "
                          f"{len(resolved.models)} models and every strategy's plan on them; ready to run.")
            return
        sweep.prepare()
        if not sweep.ranks.main:  # other processes of a multi-process run work silently; rank 0 reports
            console = Console(quiet=True)
        try:
            with interruptible():
                outcomes = run_with_progress(sweep, console)
        except KeyboardInterrupt:
            Console(stderr=True, quiet=not sweep.ranks.main).print(interrupted_message(sweep), highlight=False,
                                                                    soft_wrap=True)
            raise typer.Exit(code=130) from None
        for folder, problem in sweep.set_aside:
            console.print(f"[yellow]set aside[/] a damaged result, evaluated again: {folder} ({escape(problem)})",
                          highlight=False, soft_wrap=True)
        print_sweep_summary(outcomes, output, console)
        if sweep.superseded:
            console.print(f"{len(sweep.superseded)} finished cells of this sweep had been made by other code of their "
                          "strategy (its source changed since): they were evaluated again, and the old folders kept: "
                          + ", ".join(folder.name for folder in sweep.superseded), highlight=False, soft_wrap=True)
        if any(outcome.status == "failed" for outcome in outcomes):
            raise typer.Exit(code=1)


def interrupted_message(sweep) -> str:
    """What an interrupted sweep kept and lost, and how to go on."""
    evaluated = [o for o in sweep.outcomes if o.status == "finished"]
    skipped = sum(o.status == "skipped" for o in sweep.outcomes)
    lines = [f"interrupted: {len(evaluated)} cells evaluated in this run and {skipped} finished before are stored in "
             f"{sweep.output}; {len(sweep.cells()) - len(sweep.outcomes)} of {len(sweep.cells())} cells are not done."]
    if sweep.current is not None:
        cell = sweep.current
        lines.append(f"The cell in progress ({cell.task} {cell.strategy} {cell.budget_label}) was discarded: nothing "
                     "of it was written.")
    lines.append("Rerun the same command to resume: finished cells are skipped.")
    return "\n".join(lines)


def run_with_progress(sweep, console: Console) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pruning_zoo.runner import quiet_progress_output

    cells = sweep.cells()
    failed = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        bar = progress.add_task("sweep", total=len(cells))

        def on_cell(cell, state):
            nonlocal failed
            failed += state == "failed"
            note = f" ({failed} failed, listed at the end)" if failed else ""
            if state == "running":
                progress.update(bar, description=f"running {cell.task} {cell.strategy} {cell.budget_label}{note}")
            else:
                progress.advance(bar)

        sweep.on_cell = on_cell
        quiet_progress_output()
        outcomes = sweep.run()
        progress.update(bar, description="sweep done" + (f" ({failed} failed)" if failed else ""))
    return outcomes


def print_sweep_summary(outcomes: list, output: Path, console: Console) -> None:
    """The stored results of this sweep's cells as a table, then each failed cell once, with its error."""
    from pruning_zoo.leaderboard import cell_text, format_flops, load_results

    done = {str(o.folder.resolve()) for o in outcomes if o.status in {"finished", "skipped"}}
    if done:
        frame = load_results([output.resolve()])
        frame = frame[frame["folder"].isin(done)]
        columns = {"strategy": "strategy", "budget": "budget", "score": "score",
                   "pct_of_none": "% of none", "entering_llm": "tokens in", "average_per_layer": "per layer",
                   "llm_flops_2ndm": "LLM FLOPs (2ndm)", "evidence_recall": "evidence", "ttft_ms": "TTFT ms"}
        if len(set(frame["task"])) > 1:
            columns = {"task": "task", **columns}
        rows = []
        for row in frame.to_dict("records"):
            row["llm_flops_2ndm"] = format_flops(row["llm_flops_2ndm"])
            rows.append([cell_text(row[column], digits=3) for column in columns])
        console.print(fitted(f"{', '.join(sorted(set(frame['task'])))}: results in {output}, latency on "
                             f"{', '.join(sorted(set(frame['device'])))}", list(columns.values()), rows, console))
    counts = {state: sum(o.status == state for o in outcomes) for state in ("finished", "skipped", "failed")}
    console.print(f"{counts['finished']} cells evaluated, {counts['skipped']} already finished (skipped), "
                  f"{counts['failed']} failed.")
    for outcome in outcomes:
        if outcome.status == "failed":
            console.print(f"[red]failed[/] {outcome.cell.task} {outcome.cell.strategy} {outcome.cell.budget_label}: "
                          f"{escape(outcome.error or '')} (traceback in {outcome.folder / 'error.json'})",
                          highlight=False, soft_wrap=True)
    if counts["failed"]:
        console.print("Rerun the same command to retry the failed cells; finished ones are skipped.")
    if counts["finished"] or counts["skipped"]:
        console.print(f"Build the leaderboard with `pruning-zoo leaderboard {output}`.")


@app.command()
def leaderboard(
    results: Annotated[list[Path], typer.Argument(help="Result folders written by `pruning-zoo run`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the markdown tables and plots.")] = Path(
        "leaderboard"
    ),
) -> None:
    """Build the leaderboard (leaderboard.md, leaderboard.csv and plots/) from stored results: a pure function of
    them, with each table's provenance."""
    with user_errors():
        from pruning_zoo.leaderboard import build

        inputs.output_folder(output, "-o")
        damaged: list = []
        page, frame = build(results, output, damaged)
        console = Console()
        for folder, problem in damaged:
            console.print(f"[yellow]left out[/] damaged result {folder}: {escape(problem)}", highlight=False,
                          soft_wrap=True)
        console.print(f"wrote {page} ({len(frame)} cells) and its plots"
                      + (f"; {len(damaged)} damaged result folders left out, listed on the page" if damaged else ""))


train_app = typer.Typer(help="Train the learned parts of strategies.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("learnpruner")
def train_learnpruner_command(
    model: Annotated[str, typer.Option(help="The VLM (hub id or local folder); it stays frozen.")],
    out: Annotated[Path, typer.Option(help="Folder for learnpruner.safetensors and learnpruner.json.")],
    data: Annotated[str, typer.Option(help="'testbed' (generated questions) or a JSON / JSON-lines file of "
                                           "image/question/answer records (LLaVA conversations or flat).")] = "testbed",
    image_folder: Annotated[Path | None, typer.Option(help="Folder the records' images are relative to (default: the file's).")] = None,
    validation: Annotated[str | None, typer.Option(help="'testbed' (its validation split) or a file of records; default: "
                                                        "testbed when training on testbed, else none.")] = None,
    validation_limit: Annotated[int, typer.Option(min=1, help="Validation questions per check.")] = 256,
    budget: Annotated[int, typer.Option(min=1, help="Visual tokens after both stages (stage 1 is trained for its share).")] = 64,
    steps: Annotated[int, typer.Option(min=1)] = 600,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    micro_batch: Annotated[int | None, typer.Option(min=1, help="Examples per forward (gradients accumulate).")] = None,
    learning_rate: Annotated[float, typer.Option(min=0.0, callback=lambda v: finite(v, "--learning-rate"))] = 2e-3,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width of the module's MLP.")] = 512,
    seed: Annotated[int, typer.Option()] = 0,
    validate_every: Annotated[int, typer.Option(min=1)] = 100,
    workers: Annotated[int, typer.Option(min=0, max=MAX_WORKERS, help="Data-loader processes drawing and encoding batches.")] = 0,
    train_keep: Annotated[str, typer.Option(help="What the hard mask keeps in training: stage1 (3x the budget, as stage 1 "
                                                 "at inference) or budget.")] = "stage1",
    positions: Annotated[str | None, typer.Option(help="Positions of kept tokens in validation: keep or renumber "
                                                       "(default: the strategy's).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when there is one).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16.")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward (large models).")] = False,
    max_seconds: Annotated[float, typer.Option(min=0.0, callback=lambda v: not_nan(v, "--max-seconds"),
                                               help="Stop and save after this long; continue with --resume.")] = float("inf"),
    stop_at: Annotated[int | None, typer.Option(min=1, help="Stop after this step, leaving a resumable state.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
) -> None:
    """Train LearnPruner's pruning module end to end through a frozen VLM (straight-through hard mask, the
    VLM's own answer loss), with periodic validation accuracy; checkpoints are resumable."""
    with user_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from pruning_zoo.loading import load_vlm
        from pruning_zoo.train_learnpruner import (
            STATE, FileExamples, LearnPrunerTrainingConfig, SceneExamples, train_learnpruner, validation_examples,
        )

        problems = Problems()
        device = problems.check(inputs.device, device)
        problems.check(inputs.dtype, dtype, ("auto", "float32", "bfloat16"))
        problems.check(inputs.output_folder, out, "--out")
        if image_folder is not None:
            problems.check(inputs.input_folder, image_folder, "--image-folder", "a folder of images")
        problems.raise_if_any("the options are invalid")
        if resume and not (out / STATE).is_file():
            raise PruningZooError(f"--resume but {out / STATE} does not exist; start without --resume")
        if not resume and out.exists() and any(out.iterdir()):
            raise PruningZooError(f"--out {out} is not empty; choose a new folder (or --resume an interrupted run there)")
        config = LearnPrunerTrainingConfig(budget=budget, steps=steps, batch_size=batch_size, micro_batch=micro_batch,
                                           learning_rate=learning_rate, hidden=hidden, seed=seed, validate_every=validate_every,
                                           gradient_checkpointing=gradient_checkpointing, workers=workers, train_keep=train_keep, positions=positions,
                                           max_seconds=max_seconds,
                                           stop_at=stop_at)
        source = SceneExamples(seed) if data == "testbed" else FileExamples(Path(data), image_folder, seed)
        validation = validation or ("testbed" if data == "testbed" else None)
        held_out = validation_examples(validation, validation_limit, image_folder) if validation else []
        loaded = load_vlm(_resolve_model_path(model), device, dtype, attn_implementation="eager")
        console = Console()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            bar = progress.add_task("training", total=steps, completed=0)

            def on_step(step, values):
                text = f"loss {values['loss']:.4f}"
                if values.get("validation") is not None:
                    text += f", validation accuracy {values['validation']:.3f}"
                    progress.console.print(f"step {step}: {text}")
                progress.update(bar, completed=step, description=text)

            record = train_learnpruner(loaded.model, loaded.processor, model, source, held_out, out, config, resume=resume,
                                       command="pruning-zoo " + " ".join(sys.argv[1:]), on_step=on_step)
        if "stopped_at" in record:
            console.print(f"stopped at step {record['stopped_at']}; continue with the same options and --resume")
        else:
            console.print(f"trained in {record['seconds']} s; saved to {out} (use --param learnpruner.module={out})")


def _resolve_model_path(model: str) -> str:
    """A local folder as given, else the testbed's reference model for 'testbed', else a hub id."""
    if model == "testbed":
        from pruning_zoo.suite import builtin_suite_folder

        return str(builtin_suite_folder() / "testbed" / "model")
    return model


bench_app = typer.Typer(help="Benchmarks whose results are committed with their provenance.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("latency")
def bench_latency(
    arch: Annotated[str, typer.Option(help="Architecture, built from its config with random weights: "
                                           "llava-1.5-7b, llava-next-7b or qwen2-vl-7b.")] = "llava-1.5-7b",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    budgets: Annotated[str, typer.Option(help="Comma-separated visual-token budgets per image (the unpruned "
                                              "model runs once, as strategy none).")] = "192,128,64,32",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies.")] = (
        "none,random,pool,visionzip,fastv,transprune,learnpruner"
    ),
    param: Annotated[list[str] | None, typer.Option(help="Strategy parameter, STRATEGY.NAME=VALUE; repeatable.")] = None,
    modes: Annotated[str, typer.Option(help="eager (transformers + hooks), compiled (CUDA-graph segments), or both.")] = "eager,compiled",
    fusion: Annotated[str, typer.Option(help="torch.compile backend fusing the compiled mode's decoder layers, vision "
                                             "blocks and selections, or none (graphs of the modules' own forwards).")] = "inductor",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repetitions per cell (medians are reported).")] = 20,
    decode_tokens: Annotated[int, typer.Option(min=0, help="New tokens generated to time decoding (0: skip).")] = 16,
    dtype: Annotated[str, typer.Option(help="Weights and activations: bfloat16, float16 or float32 (to check the "
                                            "compiled mode's agreement without bf16 rounding; no floor then).")] = "bfloat16",
    out: Annotated[Path, typer.Option(help="Folder for ARCH.json (every cell, resumable) and ARCH.md.")] = Path("leaderboard/latency"),
    device: Annotated[str | None, typer.Option(help="cuda or cuda:N (default: cuda when there is one).")] = None,
) -> None:
    """Time to first token, selection overhead, decode time, memory, FLOPs and the physical floor of every
    strategy and budget, eager and compiled, on a real architecture with random weights (GPU)."""
    with user_errors():
        import torch

        from pruning_zoo.latency import LatencyPlan, architecture, check_plan, run_benchmark
        from pruning_zoo.loading import resolve_dtype

        problems = Problems()
        arch_name = problems.check(lambda: architecture(arch).name)
        chosen_modes = problems.check(inputs.name_list, modes, "--modes") or []
        batches = [problems.check(inputs.whole_number, v, "--batch", high=4096)
                   for v in problems.check(inputs.name_list, batch, "--batch") or []]
        budget_values = [problems.check(inputs.whole_number, v, "--budgets", high=MAX_BUDGET)
                         for v in problems.check(inputs.name_list, budgets, "--budgets") or []]
        overrides = problems.check(parse_param_overrides, param or []) or {}
        built = {}
        for name in problems.check(inputs.name_list, strategies, "--strategies") or []:
            strategy = problems.check(get_strategy, name, **overrides.get(name, {}))
            if strategy is not None:
                built[name] = strategy
        problems.check(inputs.dtype, dtype, ("bfloat16", "float16", "float32"))
        problems.check(inputs.output_folder, out, "--out")
        plan = LatencyPlan(arch=arch_name or arch, batches=[b for b in batches if b], strategies=built,
                           budgets=[b for b in budget_values if b], modes=chosen_modes, repeats=repeats,
                           decode_tokens=decode_tokens, fusion=None if fusion == "none" else fusion)
        if arch_name is not None:
            problems.check(check_plan, plan)
        device = problems.check(inputs.device, device, gpu_only=True)
        problems.raise_if_any("the options are invalid")
        chosen_dtype = resolve_dtype(dtype, torch.device(device))
        console = Console()

        def report(cell, measured):
            text = measured.get("error") or (f"TTFT {measured['ttft_ms']:.2f} ms, selection {measured['selection_ms']:.3f} ms"
                                            + (f", {measured['ttft_over_floor']:.2f}x floor" if "ttft_over_floor" in measured else ""))
            console.print(f"{cell.mode:8} batch {cell.batch} {cell.strategy:11} {cell.budget:4}: {text} "
                          f"({measured['seconds']:.1f} s)", highlight=False)

        run_benchmark(plan, out, device, "pruning-zoo " + " ".join(sys.argv[1:]), on_cell=report, dtype=chosen_dtype)
        console.print(f"wrote {out / (plan.arch + '.json')} and {out / (plan.arch + '.md')}")


testbed_app = typer.Typer(help="The offline testbed: generated scenes and its trained reference VLM.", no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")


@testbed_app.command("train")
def testbed_train(
    out: Annotated[Path, typer.Option(help="Folder for the model, processor and training.json.")],
    seed: Annotated[int, typer.Option(help="Seed of the weights, the scenes and the masks.")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 3000,
    scenes_per_step: Annotated[int, typer.Option(min=1, help="Scenes per step (each asks every question family it allows).")] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0, callback=lambda v: finite(v, "--learning-rate"))] = 5e-4,
    workers: Annotated[int, typer.Option(min=0, max=MAX_WORKERS, help="Data-loader processes drawing scenes.")] = 8,
    validate_every: Annotated[int, typer.Option(min=1)] = 250,
    device: Annotated[str, typer.Option(help="cuda or cpu.")] = "cuda",
    init_from: Annotated[Path | None, typer.Option(help="Continue from a model this command saved.")] = None,
    max_seconds: Annotated[float, typer.Option(min=0.0, callback=lambda v: not_nan(v, "--max-seconds"),
                                               help="Stop and save after this long, whatever --steps says.")] = float("inf"),
    extra_spatial: Annotated[int, typer.Option(min=0, help="Extra spatial questions per scene.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint an earlier call left in --out.")] = False,
    stop_at: Annotated[int | None, typer.Option(min=1, help="Stop this call after this step, leaving a checkpoint.")] = None,
) -> None:
    """Train the reference VLM from scratch (minutes on one H100) and save it like a hub model."""
    with user_errors():
        import torch

        from pruning_zoo.testbed.train import TrainingConfig, train

        problems = Problems()
        device = problems.check(inputs.device, device)
        problems.check(inputs.output_folder, out, "--out")
        if init_from is not None:
            problems.check(inputs.input_folder, init_from, "--init-from", "a model folder saved by `pruning-zoo testbed train`")
        problems.raise_if_any("the options are invalid")
        from pruning_zoo.testbed.train import CHECKPOINT

        if resume and not (out / CHECKPOINT).is_file():
            raise PruningZooError(f"--resume but {out / CHECKPOINT} does not exist; start without --resume")
        if not resume and out.exists() and any(out.iterdir()):
            raise PruningZooError(
                f"--out {out} is not empty; choose a new folder so no trained model is overwritten "
                "(or --resume an interrupted run there)"
            )
        config = TrainingConfig(seed=seed, steps=steps, scenes_per_step=scenes_per_step, learning_rate=learning_rate,
                                workers=workers, validate_every=validate_every, max_seconds=max_seconds,
                                extra_spatial=extra_spatial, stop_at=stop_at)
        if init_from is not None and not (init_from / "training.json").is_file():
            raise PruningZooError(f"--init-from {init_from} holds no model saved by `pruning-zoo testbed train`")
        record = train(out, config, device, init_from, resume=resume)
        if "stopped_at" in record:
            Console().print(f"stopped at step {record['stopped_at']}; continue with the same options and --resume")
        else:
            Console().print(f"trained in {record['seconds']} s; final validation: {record['curve'][-1]['validation_accuracy']}")


@testbed_app.command("splits")
def testbed_splits(
    out: Annotated[Path, typer.Option(help="Folder for images/ and the split files.")] = Path("suites/testbed"),
) -> None:
    """Write the fixed validation and test splits (PNG images and JSON lines with answers and evidence)."""
    with user_errors():
        from pruning_zoo.testbed.splits import SPLITS, write_split

        inputs.output_folder(out, "--out")
        for name in SPLITS:
            Console().print(f"wrote {write_split(out, name)}")


@testbed_app.command("hub-copies")
def testbed_hub_copies(
    out: Annotated[Path, typer.Option(help="Folder for the copies, one OWNER/NAME folder per dataset.")] = Path(
        "suites/hub-copies"),
    testbed: Annotated[Path | None, typer.Option(help="Folder with the testbed's test split and images (default: the "
                                                      "installed one).")] = None,
    documents: Annotated[int, typer.Option(min=8, help="Documents per task (about; MME and MMBench keep whole groups).")] = 40,
) -> None:
    """Write local copies of the image-VQA suite's hub datasets (the same columns, types, configs and splits) made
    from the testbed's test scenes, for `pruning-zoo run --suite image-vqa-local` (or `--data OUT`)."""
    from pruning_zoo.testbed.hub_copies import write_copies

    with user_errors():
        from pruning_zoo.suite import builtin_suite_folder

        testbed = testbed or builtin_suite_folder() / "testbed"
        inputs.input_folder(testbed, "--testbed", "a folder with the testbed's splits")
        if not (testbed / "test.jsonl").is_file():
            raise PruningZooError(f"--testbed {testbed} has no test.jsonl; write the splits with `pruning-zoo testbed splits`")
        inputs.output_folder(out, "--out")
        for (repository, config, split), rows in write_copies(testbed, out, documents).items():
            Console().print(f"{out / repository}: {config}/{split}, {rows} rows", highlight=False)


@testbed_app.command("evaluate")
def testbed_evaluate(
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies; 'oracle' keeps the evidence first.")] = (
        "none,random,oracle,pool,fastv,visionzip,transprune,learnpruner"
    ),
    budget: Annotated[str, typer.Option(help="Visual tokens per image (or a ratio).")] = "64",
    model: Annotated[Path | None, typer.Option(help="The reference model folder (default: the installed one).")] = None,
    data: Annotated[Path | None, typer.Option(help="Folder with the split files (default: the installed ones).")] = None,
    split: Annotated[str, typer.Option(help="validation or test.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate a fixed random subset of this many questions.")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Strategy parameter, STRATEGY.NAME=VALUE; repeatable.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the summaries and per-question results as JSON.")] = None,
) -> None:
    """Accuracy and evidence recall of strategies on a testbed split (the unpruned model with 'none')."""
    import json

    import torch

    from pruning_zoo.testbed import evaluate as testbed

    with user_errors():
        from pruning_zoo.suite import builtin_suite_folder

        model = model or builtin_suite_folder() / "testbed" / "model"
        data = data or builtin_suite_folder() / "testbed"
        problems = Problems()
        chosen = problems.check(inputs.name_list, strategies, "--strategies") or []
        overrides = problems.check(parse_param_overrides, param or []) or {}
        for name in overrides:
            if name not in chosen:
                problems.add(InvalidParameterError(f"--param names strategy {name!r}, which --strategies does not "
                                                   f"include ({', '.join(chosen)})"))
        parsed = problems.check(parse_budget, budget)
        if problems.check(inputs.input_folder, model, "--model", "a model folder") and not (model / "config.json").is_file():
            problems.add(PruningZooError(f"--model {model} holds no saved model; train one with `pruning-zoo testbed train`"))
        records = None
        if problems.check(inputs.input_folder, data, "--data", "a folder with the testbed's splits"):
            try:
                records = problems.check(lambda: testbed.sample(read_split_or_fail(data, split), limit))
            except FileNotFoundError as error:
                problems.add(PruningZooError(str(error)))
        if output is not None:
            problems.check(inputs.output_file, output, "--output")
        built = {}
        for name in chosen:
            strategy = testbed.EvidenceOracle() if name == "oracle" else problems.check(
                get_strategy, name, **overrides.get(name, {}))
            if strategy is not None:
                built[name] = strategy
        problems.raise_if_any("the options are invalid")
        vlm, processor = problems.check(testbed.load_reference, model) or (None, None)
        problems.raise_if_any("the model cannot be loaded")
        from pruning_zoo.provenance import git_sha, versions

        report = {"command": "pruning-zoo " + " ".join(sys.argv[1:]), "git_sha": git_sha(), "model": str(model), "split": split,
                  "budget": parsed, "device": "cpu", "threads": torch.get_num_threads(),
                  "versions": versions(),
                  "results": {}}
        table = Table(title=f"testbed {split}, {len(records)} questions, budget {budget}")
        for column in ("strategy", "accuracy", "evidence recall", "entering LLM", "avg / layer", "by family"):
            table.add_column(column)
        for name, strategy in built.items():
            try:
                with interruptible():
                    rows = testbed.evaluate(vlm, processor, records, data, strategy, 1.0 if name == "none" else parsed)
            except KeyboardInterrupt:
                Console().print(table)
                done = list(report["results"])
                rest = [other for other in built if other not in done]
                print_error(f"interrupted while evaluating {name}: {len(done)} of {len(built)} strategies finished "
                            f"({', '.join(done) or 'none'}), shown above" + (f"; nothing was written to {output}"
                                                                              if output is not None else "")
                            + f". Rerun to evaluate them all, or only the rest with --strategies {','.join(rest)}")
                raise typer.Exit(code=130) from None
            summary = testbed.summarise(rows)
            report["results"][name] = {"params": str(strategy.params), "summary": summary, "questions": rows}
            recall = summary["evidence_recall"]
            table.add_row(name, f"{summary['accuracy']:.3f}", "-" if recall is None else f"{recall:.3f}",
                          f"{summary['entering_llm']:.1f}", f"{summary['average_per_layer']:.1f}",
                          " ".join(f"{k[:4]}={v:.2f}" for k, v in summary["accuracy_by_family"].items()))
        Console().print(table)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            temporary = output.with_suffix(".tmp")
            temporary.write_text(json.dumps(report, indent=1) + "\n")
            temporary.replace(output)
            output.with_suffix(".md").write_text(testbed.markdown(report))


def read_split_or_fail(folder: Path, name: str):
    from pruning_zoo.testbed.splits import SPLITS, read_split

    if name not in SPLITS:
        raise PruningZooError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    return read_split(folder, name)


def main() -> None:  # pragma: no cover - console-script shim
    app(prog_name="pruning-zoo")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
