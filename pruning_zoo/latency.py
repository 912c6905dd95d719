"""The latency benchmark: what pruning buys in time to first token, on real VLM architectures built from their
configs with random weights directly on the GPU (latency does not depend on the weights' values).

Per cell (architecture x batch x strategy x budget x mode) it measures, with CUDA events, after warm-up,
as medians over repetitions:
- time to first token: vision tower and projector, selection, LLM prefill (writing the KV cache), first token;
- the selection alone (every pruning step: scoring, selecting, gathering the survivors);
- decode milliseconds per token (eager generate(), under the same strategy);
- peak GPU memory, FLOPs (the flops.py counts, x2 for FLOPs: they count multiply-accumulates), and the
  physical floor max(FLOPs / peak FLOP/s, weight bytes / memory bandwidth), summed over the vision tower and
  the LLM, with peak and bandwidth measured on the same GPU (a large bf16 matmul, a large copy).

Modes: `eager` is transformers as users run it, with the hook engine; `compiled` is the segmented prefill
(`pruning_zoo.segmented`), its segments CUDA graphs captured for their token counts, running the model's own layers,
by default through torch.compile's inductor (`fusion`), which fuses their element-wise kernels, and the
strategy's selections the same way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import inspect
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from pruning_zoo.adapters import adapter_for
from pruning_zoo.budget import resolve_budget
from pruning_zoo.engine import prune
from pruning_zoo.errors import PruningZooError, StrategyOutputError, UnknownNameError
from pruning_zoo.provenance import device_description, git_sha, versions
from pruning_zoo.segmented import SegmentedPrefill
from pruning_zoo.strategy import PruningStrategy, params_as_dict
from pruning_zoo.timing import Clock, TokenClock

MODES = ("eager", "compiled")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A VLM architecture to time: its config, and a prompt of `text` tokens around one image."""

    name: str
    description: str
    config: Callable[[], transformers.PretrainedConfig]
    #: Builds uniform inputs (one image per sample, same positions) for a model of this architecture.
    prompt: Callable[[torch.nn.Module, int, torch.Generator], dict]
    num_visual: int


def _random_text(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=generator)


def llava_prompt(text_before: int, text_after: int) -> Callable:
    """BOS, text, the image's placeholders (one per visual token), text."""

    def build(model, batch: int, generator: torch.Generator) -> dict:
        config = model.config
        vision = config.vision_config
        visual = (vision.image_size // vision.patch_size) ** 2
        image = config.image_token_id
        vocab = min(image, config.get_text_config().vocab_size)
        ids = torch.cat([
            torch.full((batch, 1), config.get_text_config().bos_token_id or 1),
            _random_text(generator, batch, text_before, vocab),
            torch.full((batch, visual), image),
            _random_text(generator, batch, text_after, vocab),
        ], dim=1)
        pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels}

    return build


def qwen2_vl_prompt(text_before: int, text_after: int, grid: tuple[int, int]) -> Callable:
    """Text, <|vision_start|>, the image's merged-patch placeholders for a (rows, cols) patch grid,
    <|vision_end|>, text; mm_token_type_ids where this transformers version asks for them."""

    def build(model, batch: int, generator: torch.Generator) -> dict:
        config = model.config
        vision = config.vision_config
        rows, cols = grid
        visual = rows * cols // vision.spatial_merge_size**2
        vocab = min(config.vision_start_token_id, config.get_text_config().vocab_size)
        parts = [
            _random_text(generator, batch, text_before, vocab),
            torch.full((batch, 1), config.vision_start_token_id),
            torch.full((batch, visual), config.image_token_id),
            torch.full((batch, 1), config.vision_end_token_id),
            _random_text(generator, batch, text_after, vocab),
        ]
        ids = torch.cat(parts, dim=1)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        inputs = {
            "input_ids": ids,
            "pixel_values": torch.randn(batch * rows * cols, patch, generator=generator),
            "image_grid_thw": torch.tensor([[1, rows, cols]] * batch),
        }
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
        return inputs

    return build


def llava_next_prompt(text_before: int, text_after: int, image_size: tuple[int, int]) -> Callable:
    """BOS, text, the image's packed tokens (base crop, unpadded any-resolution grid, a newline closing each
    row: counted by the model's own packing), text; one image of `image_size` (height, width) per sample."""

    def build(model, batch: int, generator: torch.Generator) -> dict:
        config = model.config
        vision = config.vision_config
        crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, vision.image_size)
        per_crop = (vision.image_size // vision.patch_size) ** 2
        packed, _ = model.model.pack_image_features(
            [torch.zeros(crops, per_crop, 1)], torch.tensor([list(image_size)]), config.vision_feature_select_strategy,
            image_newline=torch.zeros(1),
        )
        vocab = min(config.image_token_id, config.get_text_config().vocab_size)
        ids = torch.cat([
            torch.full((batch, 1), config.get_text_config().bos_token_id or 1),
            _random_text(generator, batch, text_before, vocab),
            torch.full((batch, packed[0].shape[0]), config.image_token_id),
            _random_text(generator, batch, text_after, vocab),
        ], dim=1)
        pixels = torch.randn(batch, crops, 3, vision.image_size, vision.image_size, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor([list(image_size)] * batch)}

    return build


def llava_1_5_7b_config() -> transformers.LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's config.json, written out (no hub here)."""
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001,
            bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
    )


def llava_next_7b_config() -> transformers.LlavaNextConfig:
    """llava-hf/llava-v1.6-vicuna-7b-hf's shapes: LLaVA-1.5-7B's CLIP tower and Vicuna-7B, with LLaVA-NeXT's
    any-resolution grid (transformers' defaults: pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008)."""
    llava = llava_1_5_7b_config()
    return transformers.LlavaNextConfig(
        vision_config=llava.vision_config, text_config=llava.text_config, image_token_index=32000,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], image_seq_length=576,
    )


def qwen2_vl_7b_config() -> transformers.Qwen2VLConfig:
    """Qwen/Qwen2-VL-7B-Instruct's config.json, written out (no hub here)."""
    return transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
            eos_token_id=151645, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


#: 576 visual tokens and 640 in all, as LLaVA-1.5 at 336 px with a short question; Qwen2-VL gets a
#: 672 x 672 image (48 x 48 patches, 576 merged tokens) so both start from the same count; LLaVA-NeXT gets the
#: same image, which its any-resolution crops turn into 2928 tokens.
ARCHITECTURES = {
    "llava-1.5-7b": Architecture("llava-1.5-7b", "LLaVA-1.5-7B: CLIP ViT-L/14-336, MLP projector, Vicuna-7B",
                                 llava_1_5_7b_config, llava_prompt(35, 28), 576),
    "llava-next-7b": Architecture("llava-next-7b", "LLaVA-NeXT-7B (v1.6 Vicuna): CLIP ViT-L/14-336 on a 672 x 672 image "
                                  "(4 crops + base: 2928 packed tokens with newlines), Vicuna-7B",
                                  llava_next_7b_config, llava_next_prompt(35, 28, (672, 672)), 2928),
    "qwen2-vl-7b": Architecture("qwen2-vl-7b", "Qwen2-VL-7B: 675M ViT at 672 px (576 merged tokens), Qwen2-7B",
                                qwen2_vl_7b_config, qwen2_vl_prompt(31, 31, (48, 48)), 576),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UnknownNameError("architecture", name, ARCHITECTURES)
    return ARCHITECTURES[name]


def build_random(arch: Architecture, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The architecture with random weights, built on `device` itself (seconds for 7B: nothing is copied)."""
    config = arch.config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# -- the device's own limits -----------------------------------------------------------------------------------
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


# -- one cell ----------------------------------------------------------------------------------------------------
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


#: What the compiled cells of git 1a76c3f and a9b821f fused; later cells list their own parts.
UNLISTED_FUSED_PARTS = ("decoder layers", "vision blocks")


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


# -- the sweep ---------------------------------------------------------------------------------------------------
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


# -- the report ------------------------------------------------------------------------------------------------
def frame(results: dict):
    """One row per measured cell."""
    import pandas as pd

    rows = []
    for entry in results["cells"]:
        cell = entry["cell"]
        rows.append({
            "batch": cell["batch"], "strategy": cell["strategy"], "budget": cell["budget"], "mode": cell["mode"],
            "ttft_ms": entry.get("ttft_ms"), "selection_ms": entry.get("selection_ms"),
            "selection_share": entry.get("selection_share"), "vision_ms": entry.get("vision_ms"),
            "llm_ms": entry.get("llm_ms"), "decode_ms_per_token": entry.get("decode_ms_per_token"),
            "peak_memory_gib": entry.get("peak_memory_gib"),
            "tflops": (entry["flops"]["vision"] + entry["flops"]["llm"]) / 1e12 if "flops" in entry else None,
            "llm_flops": entry["flops"]["llm"] if "flops" in entry else None,
            "floor_ms": entry.get("floor_ms"), "ttft_over_floor": entry.get("ttft_over_floor"),
            "eager_segments": ", ".join(entry.get("eager_segments", {})), "error": entry.get("error", ""),
            "fusion": cell.get("fusion"),
        })
    return pd.DataFrame(rows)


def _get(row, key):
    """A cell's value, None where the row or the value is missing (NaN in the frame)."""
    if row is None:
        return None
    value = row.get(key)
    return None if value is None or value != value else value


def _number(value, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _runs(results: dict) -> list[str]:
    """One line per run that made cells on the page: its command and commit, and how many cells it made. Older
    cells, which did not record their command, are counted by commit; the file's git history holds those commands."""
    runs = collections.Counter((entry.get("command"), entry.get("git_sha")) for entry in results["cells"])
    lines = []
    for (command, sha), cells in sorted(runs.items(), key=lambda item: (item[0][0] is not None, str(item[0]))):
        made = f"{cells} cell{'s' * (cells != 1)}"
        if command is None:
            lines.append(f"  - git `{sha}`: {made}, command not recorded in the cells (see this file's git history)")
        else:
            lines.append(f"  - `{command}` at git `{sha}`: {made}")
    return lines


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, checked against the measured cells: (target, measured, met)."""
    table = frame(results)
    if table.empty:
        return []
    compiled = table[(table["mode"] == "compiled") & table["ttft_ms"].notna()]
    checks = []

    def unpruned(batch):
        rows = compiled[(compiled["strategy"] == "none") & (compiled["batch"] == batch)]
        return None if rows.empty else rows.iloc[0]

    base = unpruned(1)
    if base is not None and base["ttft_over_floor"] == base["ttft_over_floor"] and base["ttft_over_floor"] is not None:
        checks.append(("unpruned TTFT within 1.5x of its floor (batch 1, compiled)",
                       f"{base['ttft_ms']:.2f} ms = {base['ttft_over_floor']:.2f}x the {base['floor_ms']:.2f} ms floor",
                       bool(base["ttft_over_floor"] <= 1.5)))
    pre_llm = ("random", "pool", "visionzip")
    for name in pre_llm:
        rows = compiled[(compiled["strategy"] == name) & (compiled["budget"] == 64) & (compiled["batch"] == 1)]
        if base is not None and not rows.empty:
            speedup = base["ttft_ms"] / rows.iloc[0]["ttft_ms"]
            checks.append((f"{name} at 64 tokens, batch 1: TTFT speedup >= 2.0x", f"{speedup:.2f}x", bool(speedup >= 2.0)))
    if not compiled.empty:
        worst = compiled.loc[compiled["selection_share"].idxmax()]
        checks.append(("selection <= 3% of TTFT, every strategy (compiled)",
                       f"largest {worst['selection_share']:.1%}: {worst['strategy']} at {worst['budget']}, batch {worst['batch']}",
                       bool(worst["selection_share"] <= 0.03)))
    # "Prefill" as the issue uses the word: the LLM's prefill, which TTFT adds to the vision tower and selection.
    # TTFT's ratio is shown beside it: the tower's time is not cut by pruning after it; and the LLM's FLOPs cut,
    # which bounds a compute-bound prefill (progressive strategies keep more tokens in their early layers).
    base8 = unpruned(8)
    for name in sorted(set(compiled["strategy"]) - {"none"}):
        rows = compiled[(compiled["strategy"] == name) & (compiled["budget"] == 64) & (compiled["batch"] == 8)]
        if base8 is not None and not rows.empty:
            pruned = rows.iloc[0]
            prefill = base8["llm_ms"] / pruned["llm_ms"]
            ratios = [f"TTFT {base8['ttft_ms'] / pruned['ttft_ms']:.2f}x"]
            if _get(base8, "llm_flops") and _get(pruned, "llm_flops"):
                ratios.append(f"LLM FLOPs cut {base8['llm_flops'] / pruned['llm_flops']:.2f}x")
            checks.append((f"{name} at 64 tokens, batch 8: LLM prefill throughput >= 4x",
                           f"{prefill:.2f}x ({'; '.join(ratios)})", bool(prefill >= 4.0)))
    return checks


def markdown(results: dict) -> str:
    """The results as a page: provenance, targets, and per batch a table of every strategy and budget."""
    from tabulate import tabulate

    table = frame(results)
    peaks = results.get("peaks") or {}
    clock = next((c["clock"] for c in results["cells"] if "clock" in c), "CUDA events")
    fusion = next((c["cell"].get("fusion") for c in results["cells"] if c["cell"]["mode"] == "compiled"), None)
    # Cells made before the selections were fused (git 1a76c3f and a9b821f) do not list their fused parts.
    parts = {tuple(c.get("fused", UNLISTED_FUSED_PARTS)) for c in results["cells"] if c["cell"]["mode"] == "compiled"}
    if not fusion:
        fused = ", the modules' own forwards (no fusion)"
    elif len(parts) == 1:
        *most, last = next(iter(parts))
        fused = f", its {', '.join(most)} and {last} through torch.compile ({fusion})"
    else:
        fused = f", through torch.compile ({fusion}), each cell what its `fused` lists (they differ)"
    packed = [c for c in results["cells"] if c.get("packed_projection_groups")]
    if packed:
        every = len(packed) == sum(c["cell"]["mode"] == "compiled" for c in results["cells"])
        fused += (", q/k/v and gate/up projections multiplied as one matrix each" +
                  ("" if every else " (in the cells listing `packed_projection_groups`)"))
    patched = [c for c in results["cells"] if c.get("patch_embeddings_as_matmul")]
    if patched:
        every = len(patched) == sum(c["cell"]["mode"] == "compiled" for c in results["cells"])
        fused += (", the patch embedding as one matrix multiplication" +
                  ("" if every else " (in the cells listing `patch_embeddings_as_matmul`)"))
    lines = [
        f"# Latency: {results['arch']} on {results['device']}",
        "",
        f"{results['description']}; random {results['dtype']} weights built from the config on the device, SDPA attention.",
        "",
        "- runs (each cell names its git SHA and, since they recorded it, its command):",
        *_runs(results),
        f"- last run: `{results['command']}` at git `{results['git_sha']}`; versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
    ]
    if peaks:
        lines.append(f"- this GPU, measured: {peaks['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 matmul, "
                     f"{peaks['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s ({peaks['how']})")
    lines += [
        f"- TTFT: vision tower + projector, selection, LLM prefill writing its KV cache, first token; {clock}, "
        "medians over the repetitions after 3 warm-up runs. `compiled`: the segmented prefill (on a GPU CUDA "
        f"graphs, timed by events inside them) over the model's own modules{fused}; `eager`: transformers' forward under the hook engine.",
        "- selection: every pruning step (scoring, selecting, gathering); decode: eager generate(), per token after "
        "the first; floor: max(FLOPs / peak, weight bytes / bandwidth) for the vision tower plus the same for the LLM.",
    ]
    skipped = {c.get("skipped_vision_blocks", 0) for c in results["cells"] if c["cell"]["mode"] == "compiled"}
    if skipped - {0}:
        lines.append(f"- `compiled` skips the last {'/'.join(map(str, sorted(skipped)))} vision block(s), whose output the "
                     "model never reads, and counts neither their FLOPs nor their weights; `eager` runs and counts them.")
    lines.append("")
    checks = targets(results)
    if checks:
        lines += ["## Targets", "", tabulate([(t, m, "met" if ok else "NOT met") for t, m, ok in checks],
                                             headers=["target", "measured", ""], tablefmt="github"), ""]
    for batch, rows in table.groupby("batch"):
        lines += [f"## Batch {batch}", ""]
        eager = rows[rows["mode"] == "eager"].set_index(["strategy", "budget"])
        compiled = rows[rows["mode"] == "compiled"].set_index(["strategy", "budget"])
        unpruned = compiled[compiled.index.get_level_values("strategy") == "none"]["ttft_ms"]
        base = unpruned.iloc[0] if len(unpruned) else None
        body = []
        keys = sorted(set(eager.index) | set(compiled.index), key=lambda k: (k[0] != "none", k[0], -k[1]))
        for key in keys:
            e = eager.loc[key] if key in eager.index else None
            c = compiled.loc[key] if key in compiled.index else None
            ttft, share = _get(c, "ttft_ms"), _get(c, "selection_share")
            body.append([
                key[0], key[1], _number(_get(e, "ttft_ms")), _number(ttft),
                _times(base / ttft if base and ttft else None),
                _number(_get(c, "selection_ms"), 3) + ("" if share is None else f" ({share:.1%})"),
                _number(_get(c, "vision_ms")), _number(_get(c, "llm_ms")), _number(_get(e, "decode_ms_per_token")),
                _number(_get(e, "peak_memory_gib"), 1) + " / " + _number(_get(c, "peak_memory_gib"), 1),
                _number(_get(c if c is not None else e, "tflops"), 2),
                _number(_get(c, "floor_ms")), _times(_get(c, "ttft_over_floor")),
                _get(c, "eager_segments") or "",
            ])
        headers = ["strategy", "budget", "TTFT eager ms", "TTFT compiled ms", "speedup", "selection ms (share)",
                   "vision ms", "LLM ms", "decode ms/token", "peak GiB eager / compiled", "TFLOPs", "floor ms", "TTFT / floor",
                   "segments run eagerly"]
        lines += [tabulate(body, headers=headers, tablefmt="github"), ""]
    errors = table[table["error"] != ""]
    for _, row in errors.iterrows():
        lines.append(f"- {row['strategy']} at {row['budget']}, batch {row['batch']}, {row['mode']}: {row['error']}")
    return "\n".join(lines) + "\n"


__all__ = ["ARCHITECTURES", "Architecture", "LatencyPlan", "build_random", "markdown", "run_benchmark"]
