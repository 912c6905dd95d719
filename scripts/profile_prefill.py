"""Where the compiled prefill's time goes, on a GPU: a diagnostic for the latency targets, not the benchmark.

    python scripts/profile_prefill.py --arch llava-1.5-7b --out DIR [--cells transprune:64:1,...]
                                      [--skip-matmuls] [--skip-variants]

1. Kernels: the fused segmented prefill (as `pruning-zoo bench latency --modes compiled` runs it) of a few cells
   (strategy:budget:batch), replays under torch.profiler, its GPU kernels summed by kind (matmul, attention,
   fused element-wise, copies); and each selection segment captured alone, replayed alone: its time and kernels.
2. Matmuls alone: every linear shape of the vision tower, projector and LLM at the cells' row counts, timed
   alone, and what one matrix for q/k/v (and for gate/up) would take instead.
3. One vision block and one decoder layer, each in a CUDA graph: the model's own forward through inductor,
   through inductor's max-autotune (Triton matmul templates with fused epilogues), and, for the vision block, one
   q/k/v matrix.

Timings are CUDA events around back-to-back runs (warm-up first), medians. Writes DIR/profile-ARCH.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pruning_zoo
from pruning_zoo.bench.architectures import architecture, build_random
from pruning_zoo.bench.capture import CapturedRun
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.provenance import device_description, git_sha, versions

CELLS = "none:576:1,pool:64:1,none:576:8,pool:64:8"


def parse_cells(text: str) -> list[tuple[str, int, int]]:
    cells = []
    for item in text.split(","):
        try:
            name, budget, batch = item.split(":")
            cells.append((name, int(budget), int(batch)))
        except ValueError:
            raise SystemExit(f"--cells takes strategy:budget:batch items separated by commas, e.g. transprune:64:1; got {item!r}")
    return cells


def timed_ms(run, inner: int = 20, outer: int = 7) -> float:
    """Median over `outer` of the mean of `inner` back-to-back runs (the GPU's queue stays full)."""
    for _ in range(3):
        run()
    samples = []
    for _ in range(outer):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def graphed(fn, *args):
    """fn(*args) captured in a CUDA graph; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph.replay


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if any(word in name for word in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "matmul")):
        return "matmul"
    if "flash" in name or "attention" in name or "fmha" in name:
        return "attention"
    if name.startswith("triton"):
        return "fused element-wise (triton)"
    if "copy" in name or "memcpy" in name or "memset" in name:
        return "copies"
    return "other"


def kernel_profile(model, arch, name: str, budget: int, batch: int) -> dict:
    strategy = pruning_zoo.get_strategy(name)
    inputs = arch.prompt(model, batch, torch.Generator().manual_seed(batch))
    inputs = {k: v.to("cuda", dtype=torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    segmented = SegmentedPrefill(model, strategy, budget, inputs, fusion="inductor")
    segmented.capture()
    ttft = timed_ms(segmented.replay, inner=5)
    entry = {"cell": {"strategy": name, "budget": budget, "batch": batch}, "ttft_ms_back_to_back": ttft,
             **kernels_of(segmented.replay, top=25), "selection_segments": []}
    entry["graphs"] = segmented.graphs
    entry["unfused_selections"] = segmented.unfused
    # Each selection's graph replays alone (captured anew, a graph per segment): it reads the tensors the segments
    # before it left, which stay put.
    if any(segment.selection for segment in segmented.segments):
        segmented.capture(joined=False)
    for step in segmented.steps:
        if isinstance(step, CapturedRun) and step.segments[0].selection:
            entry["selection_segments"].append({"segment": step.segments[0].name, "ms_back_to_back": timed_ms(step.graph.replay),
                                                **kernels_of(step.graph.replay, top=40)})
    return entry


def kernels_of(run, top: int, replays: int = 5) -> dict:
    """The GPU kernels of `replays` runs under torch.profiler, per run: summed by kind, counted, the longest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
        torch.cuda.synchronize()
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name, {"us": 0.0, "count": 0})
        entry["us"] += event.device_time / replays
        entry["count"] += 1 / replays
    kinds: dict[str, float] = {}
    for kernel, entry in kernels.items():
        kinds[kind_of(kernel)] = kinds.get(kind_of(kernel), 0.0) + entry["us"] / 1000
    longest = sorted(kernels.items(), key=lambda item: -item[1]["us"])[:top]
    return {
        "kernel_ms_by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "kernel_ms_total": round(sum(kinds.values()), 4),
        "kernels_per_replay": round(sum(e["count"] for e in kernels.values())),
        "top_kernels": [{"name": k[:160], "ms": round(e["us"] / 1000, 4), "count": round(e["count"], 1)} for k, e in longest],
    }


def matmuls(model) -> list[dict]:
    """The LLM's linear shapes at the prompt's 640 rows and 64 tokens' 128 (batch 1 and 8), and, for LLaVA, the
    CLIP tower's and projector's."""
    text = model.config.get_text_config()
    llm_shapes = {
        "q/k/v/o": (text.hidden_size, text.hidden_size),
        "one q/k/v matrix": (text.hidden_size, 3 * text.hidden_size),
        "gate or up": (text.hidden_size, text.intermediate_size),
        "one gate/up matrix": (text.hidden_size, 2 * text.intermediate_size),
        "down": (text.intermediate_size, text.hidden_size),
    }
    table = matmul_table([640, 128, 5120, 1024], llm_shapes)
    if type(model).__name__ == "LlavaForConditionalGeneration":
        vision = model.config.vision_config
        width = vision.hidden_size
        vision_shapes = {
            "vision q/k/v/o": (width, width),
            "vision one q/k/v matrix": (width, 3 * width),
            "vision fc1": (width, vision.intermediate_size),
            "vision fc2": (vision.intermediate_size, width),
            "projector 1": (width, text.hidden_size),
            "projector 2": (text.hidden_size, text.hidden_size),
        }
        table += matmul_table([577, 577 * 8], vision_shapes)
    return table


def matmul_table(rows_list: list[int], shapes: dict[str, tuple[int, int]], per_graph: int = 20) -> list[dict]:
    """Each shape's matmul, `per_graph` of them captured in one CUDA graph (timed one by one from Python, small
    ones measured the host's launches, not the kernels)."""
    out = []
    for rows in rows_list:
        for label, (k, n) in shapes.items():
            a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            replay = graphed(lambda: [F.linear(a, w) for _ in range(per_graph)])
            ms = timed_ms(replay, inner=5) / per_graph
            out.append({"rows": rows, "matmul": label, "k": k, "n": n, "ms": round(ms, 5),
                        "tflops": round(2 * rows * k * n / ms / 1e9, 1)})
    return out


def clip_block_one_qkv(block, weight, bias):
    attention = block.self_attn

    def forward(x):
        batch, tokens, width = x.shape
        heads = attention.num_heads
        h = block.layer_norm1(x)
        q, k, v = F.linear(h, weight, bias).view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=attention.scale).transpose(1, 2).reshape(batch, tokens, width)
        x = x + attention.out_proj(o)
        return x + block.mlp(block.layer_norm2(x))

    return forward


def block_variants(model, arch, batch: int, rows_llm: int) -> list[dict]:
    out = []
    device, dtype = model.device, model.dtype
    if type(model).__name__ == "LlavaForConditionalGeneration":  # CLIP
        block = adapter_for(model).vision_blocks[0]
        config = model.config.vision_config
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        x = torch.randn(batch, tokens, config.hidden_size, device=device, dtype=dtype)
        attention = block.self_attn
        weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        bias = torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
        variants = {
            "vision block, own forward, no compile": lambda: block.forward,
            "vision block, inductor": lambda: torch.compile(block.forward),
            "vision block, inductor max-autotune": lambda: torch.compile(block.forward, mode="max-autotune-no-cudagraphs"),
            "vision block, one q/k/v matrix, inductor": lambda: torch.compile(clip_block_one_qkv(block, weight, bias)),
            "vision block, one q/k/v matrix, max-autotune": lambda: torch.compile(clip_block_one_qkv(block, weight, bias),
                                                                                 mode="max-autotune-no-cudagraphs"),
        }
        with torch.no_grad():
            own = block(x, None)
            own = own[0] if isinstance(own, tuple) else own
            ours = clip_block_one_qkv(block, weight, bias)(x)
        difference = float((own.float() - ours.float()).abs().max())
        for label, make in variants.items():
            entry = time_variant(label, make, lambda f: f(x) if "one q/k/v" in label else f(x, None))
            if "one q/k/v" in label:
                entry["max_abs_difference_from_own_forward"] = difference
            out.append(entry)
    language = model.model.language_model
    layer = language.layers[0]
    hidden = torch.randn(batch, rows_llm, model.config.get_text_config().hidden_size, device=device, dtype=dtype)
    positions = torch.arange(rows_llm, device=device)[None].expand(batch, -1)
    rotary = language.rotary_emb(hidden, positions)
    variants = {
        "decoder layer, own forward, no compile": lambda: layer.forward,
        "decoder layer, inductor": lambda: torch.compile(layer.forward),
        "decoder layer, inductor max-autotune": lambda: torch.compile(layer.forward, mode="max-autotune-no-cudagraphs"),
    }
    for label, make in variants.items():
        out.append(time_variant(label, make, lambda f: f(hidden, attention_mask=None, position_ids=positions,
                                                          position_embeddings=rotary)))
    return out


def time_variant(label: str, make, call) -> dict:
    torch._dynamo.reset()
    started = time.perf_counter()
    try:
        fn = make()
        with torch.no_grad():
            call(fn)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            replay = graphed(call, fn)
            ms = timed_ms(replay, inner=20)
    except Exception as error:  # a variant that fails is reported, the others still run
        return {"variant": label, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    return {"variant": label, "ms": round(ms, 5), "compile_s": round(compile_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llava-1.5-7b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cells", default=CELLS, help="strategy:budget:batch items, comma-separated")
    parser.add_argument("--skip-matmuls", action="store_true")
    parser.add_argument("--skip-variants", action="store_true")
    args = parser.parse_args()
    cells = parse_cells(args.cells)
    torch._dynamo.config.cache_size_limit = 64
    arch = architecture(args.arch)
    model = build_random(arch, "cuda")
    report = {"arch": arch.name, "device": device_description("cuda"), "git_sha": git_sha(), "versions": versions(),
              "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{arch.name}.json"

    def save():
        path.write_text(json.dumps(report, indent=1) + "\n")

    with torch.no_grad():
        report["kernels"] = []
        for name, budget, batch in cells:
            started = time.perf_counter()
            entry = kernel_profile(model, arch, name, budget, batch)
            entry["seconds"] = round(time.perf_counter() - started, 1)
            report["kernels"].append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k not in ("top_kernels", "selection_segments")}), flush=True)
            for segment in entry["selection_segments"]:
                print("   ", json.dumps({k: v for k, v in segment.items() if k != "top_kernels"}), flush=True)
            save()
        if not args.skip_matmuls:
            report["matmuls"] = matmuls(model)
            for row in report["matmuls"]:
                print(json.dumps(row), flush=True)
            save()
    if not args.skip_variants:
        report["blocks"] = []
        for batch in (1,):
            for entry in block_variants(model, arch, batch, 640):
                entry["batch"] = batch
                report["blocks"].append(entry)
                print(json.dumps(entry), flush=True)
                save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
