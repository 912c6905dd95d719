"""`pruning-zoo bench latency`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pruning_zoo.cli.common import user_errors

app = typer.Typer(help="Benchmarks whose results are committed with their provenance.", no_args_is_help=True)


@app.command("latency")
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
        from pruning_zoo.bench.latency import plan_from_options, run_benchmark
        from pruning_zoo.bench.report import cell_line

        plan, chosen_device, chosen_dtype = plan_from_options(
            arch=arch, batch=batch, budgets=budgets, strategies=strategies, params=param or [], modes=modes,
            fusion=fusion, repeats=repeats, decode_tokens=decode_tokens, dtype=dtype, out=out, device=device)
        console = Console()

        def report(cell, measured):
            console.print(cell_line(cell, measured), highlight=False)

        run_benchmark(plan, out, chosen_device, "pruning-zoo " + " ".join(sys.argv[1:]), on_cell=report,
                      dtype=chosen_dtype)
        console.print(f"wrote {out / (plan.arch + '.json')} and {out / (plan.arch + '.md')}")
