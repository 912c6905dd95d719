"""`pruning-zoo list`, `run` and `leaderboard`: what is installed, the sweep, and the tables built from it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pruning_zoo import inputs
from pruning_zoo.cli.common import fitted, interruptible, user_errors
from pruning_zoo.errors import Problems, PruningZooError

#: What `run --dtype` takes ('auto': bfloat16 on a GPU, float32 on a CPU).
RUN_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Shown in `list` to make each strategy's plan concrete: LLaVA-1.5-7B's 576 visual tokens and 32 layers.
REFERENCE_BUDGET, REFERENCE_TOKENS, REFERENCE_LAYERS = 64, 576, 32

def list_command() -> None:
    """Show the installed strategies (with their source distribution, stages and parameters), the model
    families the engine supports, and the suites that `run` accepts."""
    from pruning_zoo import plugins
    from pruning_zoo.eval.suite import builtin_suite_files, load_suite
    from pruning_zoo.strategy import describe_field, describe_stages, param_schema

    with user_errors():
        console = Console()
        strategies, parameters = [], []
        for entry in plugins.strategies():
            strategy_class = entry.value
            try:
                stages = strategy_class().plan(REFERENCE_BUDGET, REFERENCE_TOKENS, REFERENCE_LAYERS)
                stage_text = describe_stages(stages) or "(keeps every token)"
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
    from pruning_zoo.eval.suite import load_suite, with_overrides

    with user_errors():
        console = Console()
        problems = Problems()  # every option checked, every problem named at once
        chosen_device = problems.check(inputs.device, device)
        problems.check(inputs.dtype, dtype, RUN_DTYPES)
        problems.check(inputs.output_folder, output, "--output")
        resolved = problems.check(lambda: with_overrides(
            load_suite(suite, check_strategies=False), model, inputs.name_list(tasks, "--tasks"),
            inputs.name_list(strategies, "--strategies"), inputs.name_list(budgets, "--budgets"), param or [], limit,
            batch_size, task_path, data))
        problems.raise_if_any("the options are invalid")
        from pruning_zoo.eval.runner import Sweep
        from pruning_zoo.eval.suite import suite_file

        sweep = Sweep(resolved, output, suite_folder=suite_file(suite).parent.resolve(), device=chosen_device,
                      dtype=dtype, command="pruning-zoo " + " ".join(sys.argv[1:]), compiled_latency=compiled_latency)
        if dry_run:
            source = f"; datasets from local copies in {resolved.data}" if resolved.data else ""
            cells = sweep.cells()
            table = Table(title=f"Suite {resolved.name}: {len(cells)} cells -> {output}{source}")
            for column in ("model", "task", "strategy", "budget", "parameters"):
                table.add_column(column, overflow="fold")
            for cell in cells:
                params = ", ".join(f"{k}={v}" for k, v in cell.params.items())
                table.add_row(cell.model, cell.task, cell.strategy, cell.budget_label, params or "defaults")
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
            Console(stderr=True, quiet=not sweep.ranks.main).print(sweep.interrupted_message(), highlight=False,
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


def run_with_progress(sweep, console: Console) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pruning_zoo.eval.tasks import quiet_progress_output

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
    from pruning_zoo.leaderboard.build import cell_text, format_flops, load_results

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


def leaderboard(
    results: Annotated[list[Path], typer.Argument(help="Result folders written by `pruning-zoo run`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the markdown tables and plots.")] = Path(
        "leaderboard"
    ),
) -> None:
    """Build the leaderboard (leaderboard.md, leaderboard.csv and plots/) from stored results: a pure function of
    them, with each table's provenance."""
    with user_errors():
        from pruning_zoo.leaderboard.build import build

        inputs.output_folder(output, "-o")
        damaged: list = []
        page, frame = build(results, output, damaged)
        console = Console()
        for folder, problem in damaged:
            console.print(f"[yellow]left out[/] damaged result {folder}: {escape(problem)}", highlight=False,
                          soft_wrap=True)
        console.print(f"wrote {page} ({len(frame)} cells) and its plots"
                      + (f"; {len(damaged)} damaged result folders left out, listed on the page" if damaged else ""))
