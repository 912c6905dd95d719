"""`pruning-zoo testbed train|splits|hub-copies|evaluate`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pruning_zoo import inputs, plugins
from pruning_zoo.cli.common import (
    MAX_WORKERS,
    finite,
    interruptible,
    not_nan,
    parse_param_overrides,
    print_error,
    user_errors,
)
from pruning_zoo.errors import InvalidParameterError, Problems, PruningZooError
from pruning_zoo.strategy.budget import parse_budget

app = typer.Typer(help="The offline testbed: generated scenes and its trained reference VLM.", no_args_is_help=True)


@app.command("train")
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

        from pruning_zoo.testbed.train import TrainingConfig, train

        problems = Problems()
        device = problems.check(inputs.device, device)
        problems.check(inputs.output_folder, out, "--out")
        if init_from is not None:
            problems.check(inputs.input_folder, init_from, "--init-from", "a model folder saved by `pruning-zoo testbed train`")
        problems.raise_if_any("the options are invalid")
        from pruning_zoo.testbed.train import CHECKPOINT

        inputs.training_folder(out, resume, CHECKPOINT, "trained model")
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


@app.command("splits")
def testbed_splits(
    out: Annotated[Path, typer.Option(help="Folder for images/ and the split files.")] = Path("suites/testbed"),
) -> None:
    """Write the fixed validation and test splits (PNG images and JSON lines with answers and evidence)."""
    with user_errors():
        from pruning_zoo.testbed.splits import SPLITS, write_split

        inputs.output_folder(out, "--out")
        for name in SPLITS:
            Console().print(f"wrote {write_split(out, name)}")


@app.command("hub-copies")
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
        from pruning_zoo.eval.suite import builtin_suite_folder

        testbed = testbed or builtin_suite_folder() / "testbed"
        inputs.input_folder(testbed, "--testbed", "a folder with the testbed's splits")
        if not (testbed / "test.jsonl").is_file():
            raise PruningZooError(f"--testbed {testbed} has no test.jsonl; write the splits with `pruning-zoo testbed splits`")
        inputs.output_folder(out, "--out")
        for (repository, config, split), rows in write_copies(testbed, out, documents).items():
            Console().print(f"{out / repository}: {config}/{split}, {rows} rows", highlight=False)


@app.command("evaluate")
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
    from pruning_zoo.testbed import evaluate as testbed
    from pruning_zoo.testbed.splits import read_split

    with user_errors():
        from pruning_zoo.eval.suite import builtin_suite_folder

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
                records = problems.check(lambda: testbed.sample(read_split(data, split), limit))
            except FileNotFoundError as error:
                problems.add(PruningZooError(str(error)))
        if output is not None:
            problems.check(inputs.output_file, output, "--output")
        built = {}
        for name in chosen:
            strategy = testbed.EvidenceOracle() if name == "oracle" else problems.check(
                plugins.get_strategy, name, **overrides.get(name, {}))
            if strategy is not None:
                built[name] = strategy
        problems.raise_if_any("the options are invalid")
        vlm, processor = problems.check(testbed.load_reference, model) or (None, None)
        problems.raise_if_any("the model cannot be loaded")
        report = testbed.new_report("pruning-zoo " + " ".join(sys.argv[1:]), model, split, parsed)
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
            summary = testbed.add_result(report, name, strategy, rows)
            recall = summary["evidence_recall"]
            table.add_row(name, f"{summary['accuracy']:.3f}", "-" if recall is None else f"{recall:.3f}",
                          f"{summary['entering_llm']:.1f}", f"{summary['average_per_layer']:.1f}",
                          " ".join(f"{k[:4]}={v:.2f}" for k, v in summary["accuracy_by_family"].items()))
        Console().print(table)
        if output is not None:
            testbed.write_report(report, output)
