"""The physical floor of a prefill: max(FLOPs / peak FLOP/s, weight bytes / memory bandwidth), with the peak and
the bandwidth measured on the GPU itself (a large bf16 matmul, a large copy)."""

from __future__ import annotations

import statistics

import torch

from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.timing import Clock


def device_peaks(device: str, repeats: int = 10) -> dict:
    """Achievable bf16 matmul FLOP/s and memory bandwidth of this GPU, measured: medians of a 8192^3 matmul
    and of a 2 GiB device-to-device copy (read + write)."""
    clock = Clock(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    source = torch.empty(2**30, device=device, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    matmul, copy = [], []
    for i in range(repeats + 3):
        start = clock.mark()
        a @ b
        middle = clock.mark()
        target.copy_(source)
        end = clock.mark()
        if i >= 3:
            matmul.append(clock.elapsed_ms(start, middle))
            copy.append(clock.elapsed_ms(middle, end))
    del a, b, source, target
    torch.cuda.empty_cache()
    return {
        "matmul_flops_per_s": 2 * 8192**3 / (statistics.median(matmul) / 1000),
        "bandwidth_bytes_per_s": 2 * 2**31 / (statistics.median(copy) / 1000),
        "how": "medians of 10 after 3 warm-up: bf16 8192x8192x8192 matmul; 2 GiB device copy (bytes read + written)",
    }


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights a prefill reads: the vision tower with the projector, and the LLM's layers, final norm
    and output head (the input embedding table is only gathered from, not read whole)."""
    adapter = adapter_for(model)
    vision = set(adapter.vision_module.parameters())
    for name in ("multi_modal_projector",):
        if hasattr(model.model, name):
            vision |= set(getattr(model.model, name).parameters())
    embedding = model.get_input_embeddings().weight
    llm = set(adapter.language_model.parameters()) | set(model.get_output_embeddings().parameters())
    llm.discard(embedding)
    if model.get_output_embeddings().weight is embedding:  # tied: the head reads the table
        llm.add(embedding)

    return {"vision": parameter_bytes(vision), "llm": parameter_bytes(llm)}


def parameter_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def floor_ms(flops: int, bytes_read: int, peaks: dict) -> float:
    """max(compute time, weight-read time) in milliseconds."""
    return 1000 * max(flops / peaks["matmul_flops_per_s"], bytes_read / peaks["bandwidth_bytes_per_s"])


__all__ = ["device_peaks", "floor_ms", "parameter_bytes", "weight_bytes"]
