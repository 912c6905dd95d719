"""The segmented prefill (the latency benchmark's compiled mode) computes what the hook engine computes: the
same logits for every built-in strategy, on the families it supports, and the same tokens per layer."""

from __future__ import annotations

import pytest
import tiny_models
import torch

import pruning_zoo
from pruning_zoo.bench.forwards import PrefillCache, attached
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.engine.observe import sublayer_forward, sublayer_hooks
from pruning_zoo.engine.run import prune
from pruning_zoo.errors import PruningZooError


def uniform_llava_inputs(batch_size: int) -> dict:
    rows = [[1] + tiny_models._text(b, 2) + [tiny_models.IMAGE] * 16 + tiny_models._text(b + 1, 5) for b in range(batch_size)]
    generator = torch.Generator().manual_seed(batch_size)
    return dict(input_ids=torch.tensor(rows), pixel_values=torch.randn(batch_size, 3, 56, 56, generator=generator))


def uniform_qwen_inputs(batch_size: int) -> dict:
    rows, types = [], []
    for b in range(batch_size):
        before = [1] + tiny_models._text(b, 2) + [tiny_models.QWEN_START]
        after = [tiny_models.QWEN_END] + tiny_models._text(b + 1, 4)
        rows.append(before + [tiny_models.QWEN_IMAGE] * 16 + after)
        types.append([0] * len(before) + [1] * 16 + [0] * len(after))
    generator = torch.Generator().manual_seed(batch_size)
    return dict(input_ids=torch.tensor(rows), mm_token_type_ids=torch.tensor(types),
                image_grid_thw=torch.tensor([[1, 8, 8]] * batch_size),
                pixel_values=torch.randn(batch_size * 64, 3 * 2 * 4 * 4, generator=generator))


def uniform_llava_next_inputs(batch_size: int) -> dict:
    # Every image 56 x 56: 2x2 crops and the base crop, 4 + 4*(4+1) = 24 packed tokens (newlines included).
    rows = [[1] + tiny_models._text(b, 2) + [tiny_models.IMAGE] * 24 + tiny_models._text(b + 1, 5) for b in range(batch_size)]
    generator = torch.Generator().manual_seed(batch_size)
    return dict(input_ids=torch.tensor(rows), pixel_values=torch.randn(batch_size, 5, 3, 28, 28, generator=generator),
                image_sizes=torch.tensor([[56, 56]] * batch_size))


UNIFORM = {"llava": uniform_llava_inputs, "llava_next": uniform_llava_next_inputs, "qwen2_vl": uniform_qwen_inputs,
           "qwen2_5_vl": uniform_qwen_inputs}

STRATEGIES = {
    "none": ({}, 16),
    "random": ({}, 8),
    "pool": ({}, 6),
    "visionzip": ({}, 8),
    "fastv": ({}, 6),
    "fastv-renumber": ({"positions": "renumber"}, 5),
    "transprune": ({}, 2),  # three stages (at 4 of 16 its first two would keep every token, and are left out)
    "learnpruner": ({}, 6),
    "divprune": ({}, 6),
    "dart": ({}, 6),
    "pyramiddrop": ({}, 6),
    "sparsevlm": ({}, 6),
    "vispruner": ({}, 6),
    "prumerge_plus": ({}, 6),
    "cdpruner": ({}, 6),
    "holov": ({}, 6),
    "tome": ({}, 6),
    "tome-fastv": ({"fastv_k": 1}, 6),
}
#: (case, family) a strategy refuses: ToMe merges inside the towers of LLaVA-1.5, Qwen2-VL and Qwen2.5-VL only.
REFUSED = {(case, "llava_next") for case in ("tome", "tome-fastv")}


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return tiny_models.FAMILIES["llava"].build(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module", params=sorted(UNIFORM))
def uniform_model(request, tmp_path_factory):
    family = tiny_models.FAMILIES[request.param]
    return request.param, family.build(tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("case", sorted(STRATEGIES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_segmented_prefill_gives_the_engines_logits(uniform_model, case, batch_size):
    name, model = uniform_model
    params, budget = STRATEGIES[case]
    strategy_name = case.split("-")[0]
    inputs = UNIFORM[name](batch_size)
    if (case, name) in REFUSED:
        with pytest.raises(pruning_zoo.InvalidParameterError, match="no stage inside its vision tower"):
            SegmentedPrefill(model, pruning_zoo.get_strategy(strategy_name, **params), budget, inputs)
        return
    with torch.no_grad(), prune(model, pruning_zoo.get_strategy(strategy_name, **params), budget) as run:
        expected = model(**inputs).logits[:, -1]
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy(strategy_name, **params), budget, inputs)
    segmented.run()
    torch.testing.assert_close(segmented.logits, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(segmented.first_token, expected.argmax(-1))
    (record,) = run.records
    assert segmented.visual_per_layer() == record.images[0].kept_per_layer
    assert segmented.llm_flops("2ndm") == sum(record.llm_flops("2ndm"))
    # The engine counts every block transformers runs; the segmented prefill skips those nobody reads.
    adapter = segmented.adapter
    skipped = [adapter.vision_flops(i, record.images[0].num_visual) - adapter.vision_flops(i, record.images[0].num_visual, skip_unused=True)
               for i in range(batch_size)]
    assert segmented.vision_flops == [total - less for total, less in zip(record.vision_flops(), skipped)]
    assert all(less > 0 for less in skipped) == bool(adapter.unused_vision_blocks)
    if case == "random":  # draws afresh on every call, by design
        return
    # Running again (as the benchmark's repetitions do) gives the same result.
    segmented.run()
    torch.testing.assert_close(segmented.logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["none", "visionzip", "fastv", "transprune", "learnpruner", "random"])
def test_fused_layers_compute_the_same_and_are_restored(uniform_model, case):
    """With a fusion backend the decoder layers and vision blocks run compiled forwards (their hooks, which
    VisionZip's observations need, stay outside), as do the selections (attention probe and TransPrune's
    summaries included), and give the same logits; the forwards are the modules' own again afterwards.
    TransPrune's watched layers run `sublayer_forward` compiled. Random's host draw stays eager; its gather is
    compiled."""
    name, model = uniform_model
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append({node.target for node in graph_module.graph.nodes})
        return graph_module.forward

    torch._dynamo.reset()  # each test's backend compiles afresh: earlier tests' code must not fill the cache
    params, budget = STRATEGIES[case]
    inputs = UNIFORM[name](2)
    plain = SegmentedPrefill(model, pruning_zoo.get_strategy(case, **params), budget, inputs)
    plain.run()
    fused = SegmentedPrefill(model, pruning_zoo.get_strategy(case, **params), budget, inputs, fusion=recording_backend)
    fused.run()
    if case == "random":  # draws afresh on every call: compare what it kept, gathered by the compiled gather
        plain.strategy, fused.strategy = (pruning_zoo.get_strategy("random", seed=5) for _ in range(2))
        plain.run()
        fused.run()
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-4)
    compiled = {segment.name for segment in fused.segments if hasattr(segment.run, "_torchdynamo_orig_callable")}
    host_draw = {"selection before the LLM"} if case == "random" else set()
    assert compiled == {segment.name for segment in fused.segments if segment.selection} - host_draw
    assert not any(hasattr(segment.run, "_torchdynamo_orig_callable") for segment in plain.segments)
    if case != "none":  # the selections reached the backend: their top-k (its kept indices read back in order by
        # true_indices' choice of counts), and the gather of the survivors
        assert any("gather" in targets for targets in graphs)
        if case != "random":
            assert any(torch.where in targets for targets in graphs)
    assert graphs and any(torch.nn.functional.silu in targets or torch.rsqrt in targets for targets in graphs)
    if case == "transprune":  # its summaries are compiled too, in the stages' selections
        assert any(torch.nn.functional.cosine_similarity in targets for targets in graphs)
    if case in ("fastv", "transprune"):  # and the attention probe's scores (the layers' own attention is SDPA)
        assert any("softmax" in targets for targets in graphs)
    adapter = fused.adapter
    read_blocks = [block for block in adapter.vision_blocks if block not in adapter.unused_vision_blocks]
    assert fused._fused == [*adapter.layers, *read_blocks] and adapter.vision_blocks
    assert bool(fused._watched) == (case == "transprune")
    assert not [module for module in fused._fused + adapter.unused_vision_blocks if "forward" in module.__dict__]
    # q/k/v and gate/up were multiplied as one matrix each, and the projections' forwards are their own again
    assert fused.packed and not plain.packed
    assert not [linear for pack in fused.packed for linear in pack.linears if "forward" in linear.__dict__]
    # the patch embedding was one matrix multiplication, and its forward is its own again
    assert len(fused.patch_matmuls) == 1 and not plain.patch_matmuls
    assert "forward" not in fused.patch_matmuls[0].__dict__


@pytest.mark.parametrize("fusion", [None, "aot_eager"])
def test_the_prefill_writes_the_kv_cache_the_model_writes(uniform_model, fusion):
    """Each layer's keys and values, once, contiguous: what the model's own forward caches (unpruned)."""
    name, model = uniform_model
    inputs = UNIFORM[name](2)
    with torch.no_grad():
        expected = model(**inputs, use_cache=True).past_key_values
    torch._dynamo.reset()
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy("none"), 16 if name != "llava_next" else 24, inputs,
                                 fusion=fusion)
    segmented.run()
    cache = segmented.state["layer_kwargs"]["past_key_values"]
    assert isinstance(cache, PrefillCache) and len(cache.layers) == len(expected.layers)
    for ours, theirs in zip(cache.layers, expected.layers):
        assert ours.keys.is_contiguous() and ours.values.is_contiguous()
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-4)
    with pytest.raises(PruningZooError, match="writes each layer's KV cache once"):
        cache.update(ours.keys, ours.values, 0)


def test_vision_blocks_nobody_reads_are_skipped(uniform_model, monkeypatch):
    """LLaVA's projector reads the penultimate CLIP block: the segmented prefill never computes the last one,
    and gives the engine's logits (VisionZip observes the tower through hooks, which still run around it). Its
    forward is its own again afterwards."""
    name, model = uniform_model
    inputs = UNIFORM[name](2)
    with torch.no_grad(), prune(model, pruning_zoo.get_strategy("visionzip"), 8):
        expected = model(**inputs).logits[:, -1]
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy("visionzip"), 8, inputs)
    adapter = segmented.adapter
    assert adapter.unused_vision_blocks == (adapter.vision_blocks[-1:] if name.startswith("llava") else [])
    def computed(*args, **kwargs):
        raise AssertionError("an unused vision block was computed")

    for block in adapter.unused_vision_blocks:
        monkeypatch.setattr(block.mlp, "forward", computed)
    segmented.run()
    torch.testing.assert_close(segmented.logits, expected, atol=1e-5, rtol=1e-4)
    assert not [block for block in adapter.vision_blocks if "forward" in block.__dict__]


def test_fused_selections_compile_at_every_budget_of_a_sweep(tiny_llava):
    """Each selection is compiled for its own shapes: as one shape-general code, inductor failed to lower pool's
    adaptive pooling (on the H100 and here) from the third budget of a sweep on."""
    torch._dynamo.reset()
    inputs = uniform_llava_inputs(1)
    for budget in (9, 5, 3):
        segmented = SegmentedPrefill(tiny_llava, pruning_zoo.get_strategy("pool"), budget, inputs, fusion="inductor")
        segmented.run()
        unfused = SegmentedPrefill(tiny_llava, pruning_zoo.get_strategy("pool"), budget, inputs)
        unfused.run()
        torch.testing.assert_close(segmented.logits, unfused.logits, atol=1e-5, rtol=1e-4)


def test_watched_layers_compute_the_layer_and_hand_out_what_its_hooks_see(uniform_model):
    """TransPrune's watched layers run `sublayer_forward`: the layer's own output, and the sub-block tensors its
    hooks (the hook engine's observation) see, summarized at the stage."""
    name, model = uniform_model
    strategy = pruning_zoo.get_strategy("transprune")
    segmented = SegmentedPrefill(model, strategy, 2, UNIFORM[name](2))
    segmented.run()
    assert sorted(segmented._watched_inputs) == sorted(segmented._sublayers) == sorted(segmented._watched) != []
    with torch.no_grad():
        for index, (hidden, kwargs) in segmented._watched_inputs.items():
            layer = segmented.adapter.layers[index]
            parts = {}
            with attached(sublayer_hooks(layer, parts.__setitem__)):
                own = layer(hidden, **segmented._fresh_cache(kwargs))
            ours, io = sublayer_forward(layer, hidden, **segmented._fresh_cache(kwargs))
            torch.testing.assert_close(ours, own[0] if isinstance(own, tuple) else own)
            for part, tensor in parts.items():
                torch.testing.assert_close(getattr(io, part), tensor)
            assert bool(io.valid.all()) and io.valid.shape == hidden.shape[:2]


def test_a_watched_layer_that_is_not_llama_layout_is_refused(tiny_llava):
    segmented = SegmentedPrefill(tiny_llava, pruning_zoo.get_strategy("transprune"), 2, UNIFORM["llava"](1))
    layer = segmented.adapter.layers[min(segmented._watched)]
    own = layer.forward
    layer.forward = lambda hidden, **kwargs: own(hidden, **kwargs) * 2  # a layer scaling its output
    try:
        with pytest.raises(PruningZooError, match="not a Llama-layout decoder layer.*eager engine"):
            segmented.run()
    finally:
        del layer.forward


def test_the_first_run_validates_the_selection(uniform_model):
    name, model = uniform_model
    strategy = pruning_zoo.get_strategy("random")
    strategy.select_images = lambda contexts: [pruning_zoo.strategy.Selection(keep=torch.arange(ctx.stage.keep).flip(0))
                                               for ctx in contexts]
    segmented = SegmentedPrefill(model, strategy, 8, UNIFORM[name](2))
    with pytest.raises(PruningZooError, match="ascending"):
        segmented.run()


def test_what_every_stage_kept_in_the_last_run_is_checked_after_it(tiny_llava):
    """The kept indices of each stage as the last run left them (a replay rewrites them) are checked on the host:
    valid after a run, an error naming the stage and the fault once they are not."""
    segmented = SegmentedPrefill(tiny_llava, pruning_zoo.get_strategy("transprune"), 2, UNIFORM["llava"](2))
    segmented.run()
    stages = list(segmented.kept_by_stage)
    assert [stage.after_layer for stage in stages] == [stage.after_layer for stage in segmented.stages]
    segmented.check_kept()
    segmented.run()  # a run without the first run's checks: the same entries, rewritten
    assert list(segmented.kept_by_stage) == stages
    kept, _ = segmented.kept_by_stage[stages[-1]]
    kept[1, -1] = kept[1, 0]
    with pytest.raises(pruning_zoo.errors.StrategyOutputError, match=r"\(0 outside, 1 repeated, 1 not above the one before\)"):
        segmented.check_kept()


def test_non_uniform_batches_are_refused_with_a_way_out(uniform_model):
    name, model = uniform_model
    inputs = tiny_models.FAMILIES[name].inputs(2)  # left-padded, prompts of different lengths
    with pytest.raises(PruningZooError, match="eager engine"):
        SegmentedPrefill(model, pruning_zoo.get_strategy("fastv"), 8, inputs)


def test_capture_needs_a_gpu(uniform_model):
    name, model = uniform_model
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy("none"), 16, UNIFORM[name](1))
    with pytest.raises(PruningZooError, match="CUDA"):
        segmented.capture()


@pytest.mark.parametrize("strategy_name", ["random", "pool", "fastv"])
def test_a_selection_on_the_host_is_never_captured(tiny_llava, strategy_name):
    """A graph would replay the picks `random` drew at capture; its gather is still captured."""
    strategy = pruning_zoo.get_strategy(strategy_name)
    segmented = SegmentedPrefill(tiny_llava, strategy, 8, UNIFORM["llava"](1))
    declared = {segment.name: segmented._declared_eager(segment) for segment in segmented.segments}
    expected = {"selection before the LLM": "selects on the host"} if strategy.selects_on_host else {}
    assert {name: reason for name, reason in declared.items() if reason}.keys() == expected.keys()
    for name, fragment in expected.items():
        assert fragment in declared[name]
    assert strategy.selects_on_host == (strategy_name == "random")


def test_a_vision_segment_that_disagrees_with_the_model_is_refused(uniform_model, monkeypatch):
    name, model = uniform_model
    segmented = SegmentedPrefill(model, pruning_zoo.get_strategy("none"), 16, UNIFORM[name](1))
    own = segmented.adapter.image_features
    monkeypatch.setattr(segmented.adapter, "image_features", lambda inputs: own(inputs) * 2)
    with pytest.raises(PruningZooError, match="embeddings differ"):
        segmented.run()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_towers_wait_for_no_gpu_value_on_the_host(family, tmp_path):
    """A CUDA graph cannot hold a wait for the GPU. Qwen's towers derive attention segments, rotary positions
    and windows from the grids with `.tolist()`; `capturable_vision_inputs` precomputes them. Checked with the
    meta device standing in for the GPU: reading a meta tensor's values on the host raises, as a wait would."""
    model = tiny_models.FAMILIES[family].build(tmp_path)
    adapter = pruning_zoo.engine.adapters.adapter_for(model)
    vision_inputs = {k: v for k, v in uniform_qwen_inputs(2).items() if k in ("pixel_values", "image_grid_thw")}
    capturable = adapter.capturable_vision_inputs(vision_inputs)
    with torch.no_grad():
        expected = adapter.image_features(vision_inputs)
        torch.testing.assert_close(adapter.image_features(capturable), expected, atol=0, rtol=0)
    precomputed = {"cu_seqlens", "position_ids"} | ({"window_index", "cu_window_seqlens"} if family == "qwen2_5_vl" else set())
    assert capturable.keys() == vision_inputs.keys() | precomputed
    # What the tower gets on its device goes to meta; the grids' host copy and the segment bounds stay on the host.
    host = {"image_grid_thw", "cu_seqlens", "cu_window_seqlens"}
    on_meta = {k: v if k in host else v.to("meta") for k, v in capturable.items()}
    model.to("meta")
    observed = frozenset({"vision_attention", "vision_keys", "vision_features"})
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="meta"):  # the tower's own derivation waits
            adapter.image_features({k: v.to("meta") for k, v in vision_inputs.items()})
        handles = adapter.vision_hooks(observed)
        try:
            features = adapter.image_features(on_meta)
            shared = {}
            observations = [adapter.vision_observations(i, 16, shared) for i in range(2)]
            for seen in observations:  # what VisionZip and LearnPruner read, computed without a wait
                assert seen["vision_attention"]().shape[-1] == 16
                assert seen["vision_keys"]().shape[0] == 16
                assert seen["vision_features"]().shape[0] == 16
        finally:
            for handle in handles:
                handle.remove()
    assert features.device.type == "meta" and features.shape[:2] == (2, 16)


def test_the_llava_next_tower_and_crop_counts_wait_for_no_gpu_value_on_the_host(tmp_path):
    """LLaVA-NeXT's tower and the adapter's crop counts read `image_sizes` with `.tolist()`, and transformers'
    packing copies a host list to the device (`feature_lens`): `capturable_vision_inputs` hands them a host copy
    of the sizes and the packing as an index map, applied on the device; the token sources are made once, on the
    model's device. Checked as for Qwen, the meta device standing in for the GPU, with the model's own packing
    made to fail once the inputs are prepared."""
    model = tiny_models.FAMILIES["llava_next"].build(tmp_path)
    adapter = pruning_zoo.engine.adapters.adapter_for(model)
    vision_inputs = {k: v for k, v in uniform_llava_next_inputs(2).items() if k in ("pixel_values", "image_sizes")}
    capturable = adapter.capturable_vision_inputs(vision_inputs)
    assert capturable.keys() == vision_inputs.keys() | {"packed_rows"}
    assert torch.equal(capturable["image_sizes"], vision_inputs["image_sizes"])
    assert int((capturable["packed_rows"] < 0).sum()) == 4  # a newline closing each of the grid's 4 rows
    observed = frozenset({"vision_attention", "vision_keys", "vision_features"})
    with torch.no_grad():
        expected = adapter.image_features(vision_inputs)
        torch.testing.assert_close(adapter.image_features(capturable), expected, atol=0, rtol=0)
        model.to("meta")
        with pytest.raises(NotImplementedError, match="meta"):  # the sizes on the device: the tower waits
            adapter.image_features({k: v.to("meta") for k, v in vision_inputs.items()})
        on_meta = {**capturable, "pixel_values": capturable["pixel_values"].to("meta"),
                   "packed_rows": capturable["packed_rows"].to("meta")}
        handles = adapter.vision_hooks(observed)
        try:
            features = adapter.image_features(on_meta)
            shared = {}
            for seen in [adapter.vision_observations(i, 24, shared) for i in range(2)]:  # VisionZip's, LearnPruner's
                assert seen["vision_attention"]().shape[-1] == 24
                assert seen["vision_features"]().shape[0] == 24
            assert adapter.token_sources(1, 24).crop.device.type == "meta"  # made on the device: nothing copied
            model.model.pack_image_features = None  # not called again: the packing and the sources are kept
            try:
                assert adapter.image_features(on_meta).shape == features.shape
                adapter.vision_observations(0, 24, {})["vision_attention"]()
            finally:
                del model.model.pack_image_features
        finally:
            for handle in handles:
                handle.remove()
    assert features.device.type == "meta" and features.shape[:2] == (2, 24)


def test_an_eager_segment_makes_the_readers_after_it_eager():
    """A selection reading what the segments before it kept outside the state (hooks' observations) cannot be
    captured after an eager segment or an eager selection: its graph would read what the capture saw."""
    from pruning_zoo.bench.capture import Segment, eager_reasons

    def segment(name, **flags):
        return Segment(name, lambda: None, **flags)

    segments = [segment("vision"), segment("selection before the LLM", selection=True, reads_previous=True),
                segment("gather before the LLM", selection=True, gather=True), segment("layers 0-2"),
                segment("selection after layer 2", selection=True, reads_previous=True),
                segment("gather after layer 2", selection=True, gather=True), segment("layers 3-3 and first token")]
    own = dict.fromkeys((s.name for s in segments), None)
    assert eager_reasons(segments, own) == own  # all captured
    host = {**own, "selection before the LLM": "selects on the host"}
    reasons = eager_reasons(segments, host)
    assert reasons["selection before the LLM"] == "selects on the host"
    assert reasons["selection after layer 2"].startswith("reads what an eager segment")  # an eager selection before it
    assert [name for name, reason in reasons.items() if reason] == ["selection before the LLM", "selection after layer 2"]
    vision = eager_reasons(segments, {**own, "vision": "waits for the GPU on the host"})
    assert vision["selection before the LLM"].startswith("reads what")  # right after the eager vision segment
    assert vision["selection after layer 2"].startswith("reads what")  # and after that eager selection
    assert vision["gather after layer 2"] is None and vision["layers 0-2"] is None  # these read the state alone


def test_a_selection_the_backend_fails_to_compile_runs_its_own_code(tiny_llava):
    """Inductor lowers not every reduction of every shape (an H100 run failed one of LearnPruner's at batch 8):
    that selection then runs unfused, the cell is still measured, and the failure is named."""

    def failing_on_selections(graph_module, example_inputs):
        if any(node.target is torch.where for node in graph_module.graph.nodes):  # a selection's, not a gather's
            raise NotImplementedError("NYI for this reduction")
        return graph_module.forward

    torch._dynamo.reset()
    inputs = uniform_llava_inputs(2)
    plain = SegmentedPrefill(tiny_llava, pruning_zoo.get_strategy("learnpruner"), 4, inputs)
    plain.run()
    fused = SegmentedPrefill(tiny_llava, pruning_zoo.get_strategy("learnpruner"), 4, inputs, fusion=failing_on_selections)
    fused.run()
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-4)
    assert set(fused.unfused) == {"selection before the LLM", "selection after layer 2"}
    assert all("NYI for this reduction" in reason for reason in fused.unfused.values())
    fused.run()  # later runs call the selections' own code directly
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-4)
