"""One cell of the latency benchmark, measured with CUDA events (a CPU clock on a CPU), after warm-up, as medians
over repetitions:
- time to first token: vision tower and projector, selection, LLM prefill (writing the KV cache), first token;
- the selection alone (every pruning step: scoring, selecting, gathering the survivors);
- decode milliseconds per token (eager generate(), under the same strategy);
- peak GPU memory, FLOPs (the flops.py counts, x2 for FLOPs: they count multiply-accumulates), and the
  physical floor (`pruning_zoo.bench.floor`), summed over the vision tower and the LLM;
- in the compiled mode, its agreement with the hook engine's logits.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Callable

import torch

from pruning_zoo.bench.floor import floor_ms, parameter_bytes
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.run import prune
from pruning_zoo.engine.timing import Clock, TokenClock
from pruning_zoo.errors import StrategyOutputError
from pruning_zoo.strategy import PruningStrategy


def measure(model, inputs: dict, strategy: PruningStrategy, budget: int, mode: str, repeats: int,
            decode_tokens: int, peaks: dict | None, weights: dict[str, int], fusion: str | None = None) -> dict:
    """One cell's measurements (see the module docstring); `inputs` already on the model's device."""
    device = inputs["input_ids"].device
    # Earlier cells' prefills (their graphs' memory pools) sit in reference cycles: collected now, so that neither
    # this cell's peak memory nor its room on the device counts them.
    gc.collect()
    # Also counts the FLOPs both modes compute.
    segmented = SegmentedPrefill(model, strategy, budget, inputs, fusion=fusion if mode == "compiled" else None)
    if mode == "compiled":  # skips the vision blocks nobody reads, whose weights it then never reads either
        vision_flops = 2 * sum(segmented.vision_flops)
        skipped = {p for block in segmented.skipped_vision_blocks for p in block.parameters()}
        weights = {**weights, "vision": weights["vision"] - parameter_bytes(skipped)}
    else:  # transformers runs every block
        vision_flops = 2 * sum(segmented.adapter.vision_flops(i, segmented.num_visual) for i in range(segmented.batch))
    llm_flops = 2 * segmented.llm_flops("3ndm")  # SwiGLU: three MLP matrices is what the GPU computes
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    with phase(f"the {mode} mode's timed runs"):
        spans = run_compiled(segmented, repeats) if mode == "compiled" else run_eager(model, inputs, strategy, budget, repeats)
    if mode == "compiled":  # the graphs must compute what transformers computes under the hook engine
        with phase("the hook engine's reference run"), torch.no_grad(), prune(model, strategy, budget):
            reference = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        agreement = {
            "max_abs_logit_difference": float((segmented.logits.float() - reference).abs().max()),
            "logit_scale": float(reference.abs().max()),
            "same_first_token": bool(torch.equal(segmented.first_token, reference.argmax(-1))),
        }
    # Decoding runs the same engine in both modes: measured once, with the eager cell.
    decode = decode_ms_per_token(model, inputs, strategy, budget, decode_tokens) if mode == "eager" and decode_tokens > 1 else None
    result = {
        "ttft_ms": statistics.median(spans["ttft"]),
        "selection_ms": statistics.median(spans["selection"]),
        "vision_ms": statistics.median(spans["vision"]),
        "llm_ms": statistics.median(spans["llm"]),
        "decode_ms_per_token": decode,
        "repeats": len(spans["ttft"]),
        "flops": {"vision": vision_flops, "llm": llm_flops},
        "visual_tokens_per_layer": segmented.visual_per_layer(),
        "tokens": segmented.length,
        "clock": Clock(device).kind,
    }
    result["selection_share"] = result["selection_ms"] / result["ttft_ms"]
    if mode == "compiled":
        result["eager_segments"] = spans["eager_segments"]
        result["agreement_with_eager"] = agreement
        result["fused"] = segmented.fused_parts
        result["skipped_vision_blocks"] = len(segmented.skipped_vision_blocks)
        result["cuda_graphs"] = segmented.graphs
        result["unfused_selections"] = segmented.unfused
        result["packed_projection_groups"] = len(segmented.packed)
        result["patch_embeddings_as_matmul"] = len(segmented.patch_matmuls)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if peaks is not None:
        floor = floor_ms(vision_flops, weights["vision"], peaks) + floor_ms(llm_flops, weights["llm"], peaks)
        result["floor_ms"] = floor
        result["ttft_over_floor"] = result["ttft_ms"] / floor
    return result


@contextlib.contextmanager
def phase(name: str):
    """A strategy's invalid output names the part of the cell that met it (the cell's error says where to look)."""
    try:
        yield
    except StrategyOutputError as error:
        raise StrategyOutputError(f"{name}: {error}") from error


def _spans(clock: Clock) -> dict[str, float]:
    totals = {name: clock.total_ms(name) for name in ("vision", "selection", "llm")}
    return totals


def run_compiled(segmented: SegmentedPrefill, repeats: int) -> dict:
    device = segmented.input_ids.device
    if device.type == "cuda":
        segmented.capture()
        replay = segmented.replay
    else:
        segmented.run()  # CPU (tests): the same segments, eagerly
        replay = segmented.run
    for _ in range(3):
        replay()
    measured = {"ttft": [], "vision": [], "selection": [], "llm": []}
    for _ in range(repeats):
        clock = Clock(device)
        start = clock.mark()
        replay(clock)
        end = clock.mark()
        measured["ttft"].append(clock.elapsed_ms(start, end))
        for name, value in _spans(clock).items():
            measured[name].append(value)
    segmented.check_kept()  # what the timed graphs selected
    measured["eager_segments"] = segmented.eager_segments
    return measured


def run_eager(model, inputs: dict, strategy: PruningStrategy, budget: int, repeats: int) -> dict:
    """The hook engine around the model's own forward (prefill with its KV cache, last position's logits)."""
    device = inputs["input_ids"].device
    adapter = adapter_for(model)
    measured = {"ttft": [], "vision": [], "selection": [], "llm": []}
    for repeat in range(3 + repeats):
        clock = Clock(device)
        marks = {}
        handles = [
            adapter.vision_module.register_forward_pre_hook(marker(marks, "vision_start", clock)),
            adapter.vision_module.register_forward_hook(marker(marks, "vision_end", clock)),
        ]
        try:
            with torch.no_grad(), prune(model, strategy, budget, clock):
                start = clock.mark()
                output = model(**inputs, use_cache=True, logits_to_keep=1)
                output.logits[:, -1].argmax(dim=-1)
                end = clock.mark()
        finally:
            for handle in handles:
                handle.remove()
        if repeat < 3:
            continue
        ttft = clock.elapsed_ms(start, end)
        vision = clock.elapsed_ms(marks["vision_start"], marks["vision_end"])
        selection = clock.total_ms("selection")
        measured["ttft"].append(ttft)
        measured["vision"].append(vision)
        measured["selection"].append(selection)
        measured["llm"].append(ttft - vision - selection)
    return measured


def marker(marks: dict, name: str, clock: Clock) -> Callable:
    """A hook that marks `name` on `clock` when the module runs."""

    def hook(*_):
        marks[name] = clock.mark()

    return hook


def decode_ms_per_token(model, inputs: dict, strategy: PruningStrategy, budget: int, tokens: int) -> float:
    """Median over 3 runs (after one warm-up) of generate()'s time per new token after the first, eager."""
    device = inputs["input_ids"].device
    values = []
    for repeat in range(4):
        clock = Clock(device)
        streamer = TokenClock(clock)
        with torch.no_grad(), prune(model, strategy, budget):
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=streamer,
                           pad_token_id=0)
        if repeat:
            values.append(clock.elapsed_ms(streamer.marks[0], streamer.marks[-1]) / (len(streamer.marks) - 1))
    return statistics.median(values)


__all__ = ["decode_ms_per_token", "measure", "phase", "run_compiled", "run_eager"]
