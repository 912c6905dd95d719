"""The latency benchmark: what pruning buys in time to first token, on real VLM architectures built from their
configs with random weights directly on the GPU (latency does not depend on the weights' values).

Per cell (architecture x batch x strategy x budget x mode) it measures time to first token and its parts, decode
time, memory, FLOPs and the physical floor (`pruning_zoo.bench.measure`); the architectures are
`pruning_zoo.bench.architectures`, the page `pruning_zoo.bench.report`. This module holds the plan and the run:
which cells, their results file (resumable), and the command's options checked into a plan.

Modes: `eager` is transformers as users run it, with the hook engine; `compiled` is the segmented prefill
(`pruning_zoo.bench.segmented`), its segments CUDA graphs captured for their token counts, running the model's own layers,
by default through torch.compile's inductor (`fusion`), which fuses their element-wise kernels, and the
strategy's selections the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pruning_zoo import inputs, plugins
from pruning_zoo.bench.architectures import Architecture, architecture, build_random
from pruning_zoo.bench.floor import device_peaks, weight_bytes
from pruning_zoo.bench.measure import measure
from pruning_zoo.bench.report import markdown
from pruning_zoo.engine.loading import resolve_dtype
from pruning_zoo.errors import Problems, PruningZooError, StrategyOutputError
from pruning_zoo.provenance import device_description, git_sha, versions
from pruning_zoo.strategy import PruningStrategy, params_as_dict
from pruning_zoo.strategy.budget import MAX_BUDGET, resolve_budget
from pruning_zoo.strategy.params import parse_param_overrides

MODES = ("eager", "compiled")


@dataclasses.dataclass(frozen=True)
class LatencyCell:
    arch: str
    batch: int
    strategy: str
    params: dict
    budget: int
    mode: str
    #: The compiled mode's torch.compile backend for layers, vision blocks and selections (None: graphs of the
    #: modules' own forwards).
    fusion: str | None = None

    @property
    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass
class LatencyPlan:
    arch: str
    batches: list[int]
    budgets: list[int]
    strategies: dict[str, PruningStrategy]
    modes: list[str]
    repeats: int = 20
    decode_tokens: int = 16
    #: torch.compile backend of the compiled mode (None: CUDA graphs of the modules' own forwards).
    fusion: str | None = "inductor"

    def cells(self, num_visual: int) -> list[tuple[LatencyCell, PruningStrategy]]:
        cells = []
        for mode in self.modes:
            for batch in self.batches:
                for name, strategy in self.strategies.items():
                    budgets = [num_visual] if name == "none" else [b for b in self.budgets if b < num_visual]
                    for budget in budgets:
                        cell = LatencyCell(self.arch, batch, name, params_as_dict(strategy.params), budget, mode,
                                           self.fusion if mode == "compiled" else None)
                        cells.append((cell, strategy))
        return cells


def read_results(path: Path) -> dict:
    if not path.is_file():
        return {"cells": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PruningZooError(f"{path} is not a results file this benchmark wrote ({error}); move it away or "
                              "choose another --out") from None


def write_results(path: Path, results: dict) -> None:
    """Atomically: an interrupted write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


def check_plan(plan: LatencyPlan, arch: Architecture | None = None) -> None:
    """The plan's modes, fusion backend and budgets exist for its architecture (checked before anything is built)."""
    arch = arch or architecture(plan.arch)
    for mode in plan.modes:
        if mode not in MODES:
            raise PruningZooError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if plan.fusion is not None and plan.fusion not in backends:
        raise PruningZooError(f"unknown fusion {plan.fusion!r}: give a torch.compile backend ({', '.join(torch._dynamo.list_backends())}) "
                              "or none")
    too_large = [b for b in plan.budgets if b > arch.num_visual]
    if too_large:
        raise PruningZooError(f"budgets {too_large} exceed the {arch.num_visual} visual tokens of {arch.name}'s prompt; "
                              f"give budgets below {arch.num_visual} (the unpruned model is measured as strategy none)")


def run_benchmark(plan: LatencyPlan, out: Path, device: str, command: str, arch: Architecture | None = None,
                  dtype: torch.dtype = torch.bfloat16, on_cell: Callable | None = None) -> dict:
    """Measure every cell of `plan` not yet in `out`/<arch>.json, writing the file after each cell (a crash
    or a time limit loses nothing finished; rerunning continues)."""
    arch = arch or architecture(plan.arch)
    check_plan(plan, arch)
    path = out / f"{arch.name}.json"
    results = read_results(path)
    description = device_description(device)
    if results["cells"] and results.get("device") != description:
        raise PruningZooError(f"{path} holds results measured on {results.get('device')}, not on {description}; "
                              "choose another --out so devices are never mixed")
    dtype_name = str(dtype).removeprefix("torch.")
    if results["cells"] and results.get("dtype", "bfloat16") != dtype_name:
        raise PruningZooError(f"{path} holds results in {results.get('dtype', 'bfloat16')}, not {dtype_name}; choose "
                              "another --out so dtypes are never mixed")
    fusions = {c["cell"].get("fusion") for c in results["cells"] if c["cell"]["mode"] == "compiled"}
    if "compiled" in plan.modes and fusions - {plan.fusion}:
        raise PruningZooError(f"{path} holds compiled cells measured with fusion {', '.join(map(str, sorted(fusions, key=str)))}, "
                              f"not {plan.fusion}; choose another --out so they are never mixed in one table")
    def key(entry: dict) -> str:
        return json.dumps({"fusion": None, **entry["cell"]}, sort_keys=True)

    done = {key(entry) for entry in results["cells"] if "error" not in entry}  # a failed cell is tried again
    for entry in results["cells"]:  # cells measured by an earlier run keep that run's commit
        entry.setdefault("git_sha", results.get("git_sha"))
    model = build_random(arch, device, dtype)
    # The peaks are a bf16 matmul's and a copy's: a floor only for bf16 weights.
    peaks = device_peaks(device) if device.startswith("cuda") and dtype == torch.bfloat16 else None
    weights = weight_bytes(model)
    results.update(arch=arch.name, description=arch.description, device=description, dtype=dtype_name,
                   git_sha=git_sha(), versions=versions(), command=command, peaks=peaks, weight_bytes=weights)
    generator = torch.Generator().manual_seed(0)
    for cell, strategy in plan.cells(arch.num_visual):
        if cell.key in done:
            continue
        inputs = arch.prompt(model, cell.batch, torch.Generator().manual_seed(generator.initial_seed() + cell.batch))
        inputs = {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        budget = resolve_budget(cell.budget, arch.num_visual)
        started = time.perf_counter()
        try:
            measured = measure(model, inputs, strategy, budget, cell.mode, plan.repeats, plan.decode_tokens, peaks,
                               weights, cell.fusion)
        except torch.cuda.OutOfMemoryError as error:
            measured = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            torch.cuda.empty_cache()
        except torch._dynamo.exc.TorchDynamoException as error:  # the other cells may still be measured
            measured = {"error": f"torch.compile ({cell.fusion}) failed: {str(error).splitlines()[0]}"}
        except StrategyOutputError as error:  # one strategy's fault on one cell: recorded, the sweep goes on
            measured = {"error": str(error)}
        # What the cell cost, compilation and capture included: to plan the next run on a lent GPU.
        measured["seconds"] = round(time.perf_counter() - started, 2)
        results["cells"] = [entry for entry in results["cells"] if key(entry) != cell.key]
        results["cells"].append({"cell": dataclasses.asdict(cell), "git_sha": results["git_sha"], "command": command, **measured})
        write_results(path, results)
        path.with_suffix(".md").write_text(markdown(results))
        if on_cell is not None:
            on_cell(cell, measured)
    return results



def plan_from_options(arch: str, batch: str, budgets: str, strategies: str, params: list[str], modes: str, fusion: str,
                      repeats: int, decode_tokens: int, dtype: str, out: Path,
                      device: str | None) -> tuple[LatencyPlan, str, torch.dtype]:
    """`pruning-zoo bench latency`'s options, as the command line gives them (comma-separated lists, parameter
    overrides as STRATEGY.NAME=VALUE, fusion `none`), checked before anything is built, every problem reported at
    once: the plan, the device and the dtype to run it on."""
    problems = Problems()
    arch_name = problems.check(lambda: architecture(arch).name)
    chosen_modes = problems.check(inputs.name_list, modes, "--modes") or []
    batches = [problems.check(inputs.whole_number, v, "--batch", high=4096)
               for v in problems.check(inputs.name_list, batch, "--batch") or []]
    budget_values = [problems.check(inputs.whole_number, v, "--budgets", high=MAX_BUDGET)
                     for v in problems.check(inputs.name_list, budgets, "--budgets") or []]
    overrides = problems.check(parse_param_overrides, params) or {}
    built = {}
    for name in problems.check(inputs.name_list, strategies, "--strategies") or []:
        strategy = problems.check(plugins.get_strategy, name, **overrides.get(name, {}))
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
    return plan, device, resolve_dtype(dtype, torch.device(device))


__all__ = ["MODES", "LatencyCell", "LatencyPlan", "check_plan", "plan_from_options", "read_results", "run_benchmark",
           "write_results"]
