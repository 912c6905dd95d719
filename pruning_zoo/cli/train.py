"""`pruning-zoo train learnpruner`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pruning_zoo import inputs
from pruning_zoo.cli.common import MAX_WORKERS, finite, not_nan, user_errors
from pruning_zoo.errors import Problems

app = typer.Typer(help="Train the learned parts of strategies.", no_args_is_help=True)


@app.command("learnpruner")
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

        from pruning_zoo.engine.loading import load_vlm
        from pruning_zoo.train.examples import model_path, training_sources
        from pruning_zoo.train.learnpruner import STATE, LearnPrunerTrainingConfig, train_learnpruner

        problems = Problems()
        device = problems.check(inputs.device, device)
        problems.check(inputs.dtype, dtype, ("auto", "float32", "bfloat16"))
        problems.check(inputs.output_folder, out, "--out")
        if image_folder is not None:
            problems.check(inputs.input_folder, image_folder, "--image-folder", "a folder of images")
        problems.raise_if_any("the options are invalid")
        inputs.training_folder(out, resume, STATE, "trained module")
        config = LearnPrunerTrainingConfig(budget=budget, steps=steps, batch_size=batch_size, micro_batch=micro_batch,
                                           learning_rate=learning_rate, hidden=hidden, seed=seed, validate_every=validate_every,
                                           gradient_checkpointing=gradient_checkpointing, workers=workers, train_keep=train_keep, positions=positions,
                                           max_seconds=max_seconds,
                                           stop_at=stop_at)
        source, held_out = training_sources(data, validation, validation_limit, image_folder, seed)
        loaded = load_vlm(model_path(model), device, dtype, attn_implementation="eager")
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
