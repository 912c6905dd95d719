"""The engine over tiny models of every family: exact keep-all, cache-consistent generation, hook removal,
batches with padding and different visual-token counts, progressive stages, achieved budgets and errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Selection, Stage

STEPS = 4


class Progressive(PruningStrategy):
    """Test strategy: a pre-LLM stage and two in-LLM stages, scored by token feature sums."""

    name = "progressive"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (
            Stage(after_layer=None, keep=min(num_visual, 2 * budget)),
            Stage(after_layer=0, keep=min(num_visual, budget + budget // 2)),
            Stage(after_layer=2, keep=budget),
        )

    def score(self, ctx):
        return ctx.tokens.float().sum(-1)


class Recording(PruningStrategy):
    """Wraps a strategy and records every selection, in call order."""

    name = "recording"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def __init__(self, inner: PruningStrategy):
        super().__init__()
        self.inner, self.params, self.selections = inner, inner.params, []
        self.observes = inner.observes  # the engine builds only the observations a strategy asks for

    def plan(self, budget, num_visual, num_layers):
        return self.inner.plan(budget, num_visual, num_layers)

    def score(self, ctx):
        return self.inner.score(ctx)

    def select(self, scores, keep, ctx):
        selection = self.inner.select(scores, keep, ctx)
        self.selections.append(selection)
        return selection


class Replay(Recording):
    """Replays recorded selections, forward after forward, so a recomputation prunes exactly the same tokens."""

    def __init__(self, recording: Recording):
        PruningStrategy.__init__(self)
        self.inner, self.params, self.recorded, self.calls = recording.inner, recording.params, recording.selections, 0
        self.observes = recording.observes

    def select(self, scores, keep, ctx):
        selection = self.recorded[self.calls % len(self.recorded)]
        self.calls += 1
        return selection


CASES = {
    "random": lambda: (pruning_zoo.get_strategy("random"), 0.5),
    "pool-keep-positions": lambda: (pruning_zoo.get_strategy("pool", positions="keep"), 0.5),
    "fastv-k1": lambda: (pruning_zoo.get_strategy("fastv", k=1), 0.6),
    "fastv-k2-renumber": lambda: (pruning_zoo.get_strategy("fastv", k=2, positions="renumber"), 0.75),
    "progressive-renumber": lambda: (Progressive(), 3),
    "progressive-keep": lambda: (Progressive({"positions": "keep"}), 3),
    "dart": lambda: (pruning_zoo.get_strategy("dart"), 0.5),
    "pyramiddrop": lambda: (pruning_zoo.get_strategy("pyramiddrop"), 1),
    "vispruner": lambda: (pruning_zoo.get_strategy("vispruner"), 0.5),
    "prumerge_plus": lambda: (pruning_zoo.get_strategy("prumerge_plus"), 0.5),
    "cdpruner": lambda: (pruning_zoo.get_strategy("cdpruner"), 0.5),
    "holov-sequence": lambda: (pruning_zoo.get_strategy("holov", partition="sequence"), 0.5),
    "holov-grid": lambda: (pruning_zoo.get_strategy("holov", partition="grid"), 0.5),
}
#: Strategies whose keep-all (budget 1.0) must give the unpruned logits exactly, beside `none`.
KEEP_ALL = {"dart": {}, "pyramiddrop": {}, "sparsevlm": {}, "vispruner": {}, "prumerge_plus": {}, "cdpruner": {},
            "holov": {"partition": "grid"}}


def greedy(model):
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=STEPS, do_sample=False)
    return config


def _steps_until_eos(tokens: torch.Tensor, eos) -> int:
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    for step, token in enumerate(tokens.tolist()):
        if token in eos:
            return step + 1
    return len(tokens)


def position_ids_like_generate(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def recompute_without_cache(model, family, inputs, strategy, budget, steps):
    """Greedy decoding by re-running the whole pruned sequence at every step, no KV cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    logits = []
    for _ in range(steps):
        step_inputs = dict(extra, input_ids=ids, attention_mask=mask, use_cache=False)
        if "mm_token_type_ids" in inputs:
            types = inputs["mm_token_type_ids"]
            step_inputs["mm_token_type_ids"] = torch.cat([types, torch.zeros(types.shape[0], ids.shape[1] - types.shape[1], dtype=types.dtype)], 1)
        else:
            step_inputs["position_ids"] = position_ids_like_generate(mask)
        with prune(model, strategy, budget):
            last = model(**step_inputs).logits[:, -1]
        logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, -steps:], torch.stack(logits, 1)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_keep_all_reproduces_the_unpruned_logits_exactly(family_model, batch_size):
    family, model = family_model
    inputs = family.inputs(batch_size)
    with torch.no_grad():
        reference = model(**inputs).logits
        with prune(model, pruning_zoo.get_strategy("none"), 1.0) as run:
            pruned = model(**inputs).logits
    assert torch.equal(reference, pruned)
    (record,) = run.records
    assert [image.entering_llm for image in record.images] == [image.num_visual for image in record.images]


@pytest.mark.parametrize("name", KEEP_ALL)
def test_a_strategys_keep_all_reproduces_the_unpruned_logits_exactly(family_model, name):
    family, model = family_model
    inputs = family.inputs(3)
    with torch.no_grad():
        reference = model(**inputs).logits
        with prune(model, pruning_zoo.get_strategy(name, **KEEP_ALL[name]), 1.0):
            assert torch.equal(model(**inputs).logits, reference)


def test_keep_all_is_exact_with_eager_attention_too(family_model):
    family, model = family_model
    inputs = family.inputs(3)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            reference = model(**inputs).logits
            with prune(model, pruning_zoo.get_strategy("none"), 1.0):
                assert torch.equal(reference, model(**inputs).logits)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("label", CASES)
def test_cached_generation_equals_recomputing_the_pruned_sequence(family_model, label):
    family, model = family_model
    strategy, budget = CASES[label]()
    inputs = family.inputs(3)
    recording = Recording(strategy)
    with torch.no_grad():
        with prune(model, recording, budget) as run:
            generated = model.generate(**inputs, generation_config=greedy(model), output_logits=True,
                                       return_dict_in_generate=True)
        tokens, logits = recompute_without_cache(model, family, inputs, Replay(recording), budget, STEPS)
    cached_tokens, cached_logits = generated.sequences[:, -STEPS:], torch.stack(generated.logits, 1)
    # A row that emits EOS is padded afterwards; compare each row up to its EOS.
    for row in range(cached_tokens.shape[0]):
        steps = _steps_until_eos(cached_tokens[row], model.generation_config.eos_token_id)
        assert torch.equal(cached_tokens[row, :steps], tokens[row, :steps]), label
        torch.testing.assert_close(cached_logits[row, :steps], logits[row, :steps], rtol=1e-4, atol=1e-4)
    assert len(run.records) == 1  # one prefill; decode steps do not re-prune


def test_hooks_are_gone_after_the_block(family_model):
    family, model = family_model
    inputs = family.inputs(3)
    with torch.no_grad():
        reference = model(**inputs).logits
        # Counted after a forward: transformers registers its own output-capture hooks on first use.
        hooks_before = _count_hooks(model)
        with prune(model, pruning_zoo.get_strategy("fastv", k=1), 0.5):
            assert model(**inputs).logits.shape[1] < reference.shape[1]
        assert _count_hooks(model) == hooks_before
        assert torch.equal(model(**inputs).logits, reference)


def test_hooks_are_removed_when_the_block_raises(family_model):
    family, model = family_model
    hooks_before = _count_hooks(model)
    with pytest.raises(RuntimeError, match="inside the block"):
        with prune(model, pruning_zoo.get_strategy("random"), 2):
            raise RuntimeError("inside the block")
    assert _count_hooks(model) == hooks_before


def _count_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_achieved_budgets_are_recorded(family_model):
    family, model = family_model
    inputs = family.inputs(3)
    layers = model.config.get_text_config().num_hidden_layers
    with torch.no_grad(), prune(model, pruning_zoo.get_strategy("random"), 4) as run:
        model(**inputs)
    for image in run.records[-1].images:
        assert image.kept_per_layer == [4] * layers and image.entering_llm == 4 and image.average_per_layer == 4
    fastv_by_average = pruning_zoo.get_strategy("fastv", k=1, budget_counts="per_layer_average")
    with torch.no_grad(), prune(model, fastv_by_average, 0.5) as run:
        model(**inputs)
    for image in run.records[-1].images:
        n = image.num_visual
        kept = round((round(0.5 * n) * layers - n) / (layers - 1))
        assert image.kept_per_layer == [n] + [kept] * (layers - 1)
        assert image.entering_llm == n
    # every sample lost exactly its images' dropped tokens after layer 0
    record = run.records[-1]
    for sample, tokens in enumerate(record.tokens_per_layer):
        dropped = sum(i.num_visual - i.kept_per_layer[-1] for i in record.images if i.sample == sample)
        assert tokens[0] - tokens[-1] == dropped


def test_progressive_stages_compose(family_model):
    family, model = family_model
    with torch.no_grad(), prune(model, Progressive(), 2) as run:
        model(**family.inputs(3))
    for image in run.records[-1].images:
        assert image.kept_per_layer == [4, 3, 3, 2]


def test_fastv_sees_the_attention_eager_attention_computes(family_model):
    """The engine's last-token attention (from q/k projections, under SDPA) equals eager attention weights."""
    family, model = family_model
    inputs = family.inputs(3)
    seen = []

    class Spy(PruningStrategy):
        name = "spy"
        budget_meaning = BudgetMeaning.ENTERING_LLM
        observes = frozenset({"last_token_attention"})

        def plan(self, budget, num_visual, num_layers):
            return (Stage(after_layer=1, keep=budget),)

        def score(self, ctx):
            seen.append(ctx.observe("last_token_attention"))
            return ctx.observe("last_token_attention").mean(0)

    with torch.no_grad():
        with prune(model, Spy(), 2):
            model(**inputs)
        model.set_attn_implementation("eager")
        try:
            attentions = model(**inputs, output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
    image = inputs["input_ids"] == model.config.image_token_id
    for sample in range(3):
        expected = attentions[1][sample, :, -1, image[sample]].float()
        torch.testing.assert_close(seen[sample], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "budget, message",
    [(100, "larger than the 16 visual tokens"), (0, "at least 1 visual token"), (-2, "at least 1 visual token")],
)
def test_impossible_budgets_are_clear_errors(budget, message):
    import tiny_models

    family = tiny_models.FAMILIES["llava"]
    model = family.model_class(family.config()).eval()
    with pytest.raises(pruning_zoo.InvalidParameterError, match=message):
        with prune(model, pruning_zoo.get_strategy("random"), budget):
            model(**family.inputs(1))


def test_a_stage_outside_the_model_is_a_clear_error():
    import tiny_models

    class TooDeep(Progressive):
        def plan(self, budget, num_visual, num_layers):
            return (Stage(after_layer=num_layers - 1, keep=budget),)

    family = tiny_models.FAMILIES["llava"]
    model = family.model_class(family.config()).eval()
    with pytest.raises(pruning_zoo.InvalidParameterError, match="after layer 3, outside this model's decoder layers 0..2"):
        with prune(model, TooDeep(), 2):
            model(**family.inputs(1))
    with pytest.raises(pruning_zoo.InvalidParameterError, match="fastv.k=4 must be below the model's 4"):
        with prune(model, pruning_zoo.get_strategy("fastv", k=4), 0.5):
            model(**family.inputs(1))


class Misbehaving(Progressive):
    """Test strategy: one pre-LLM stage whose scores or selections are wrong in the way `fault` names."""

    def __init__(self, fault):
        super().__init__()
        self.fault = fault

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        return torch.zeros(ctx.tokens.shape[0] + 1) if self.fault == "scores" else ctx.tokens.float().sum(-1)

    def select_images(self, contexts):
        if self.fault == "count":
            return super().select_images(contexts)[:-1]
        if self.fault == "indices":
            return [Selection(keep=torch.arange(ctx.stage.keep).flip(0)) for ctx in contexts]
        return super().select_images(contexts)


@pytest.mark.parametrize("fault, message", [
    ("scores", r"returned scores of shape \(17,\) before the LLM: keep 2; expected one score per visual token, shape \(16,\)"),
    ("count", r"gave 1 selections for 2 images; select_images returns one Selection per context"),
    ("indices", r"selected invalid indices before the LLM: keep 2: they must be ascending"),
])
def test_a_strategy_that_breaks_the_interface_is_a_clear_error(fault, message):
    import tiny_models

    family = tiny_models.FAMILIES["llava"]
    model = family.model_class(family.config()).eval()
    with pytest.raises(pruning_zoo.PruningZooError, match=message), torch.no_grad():
        with prune(model, Misbehaving(fault), 2):
            model(**family.inputs(2))


def test_an_unknown_model_is_a_clear_error():
    with pytest.raises(pruning_zoo.UnknownNameError, match="unknown model type .*'bert'.*known: llava"):
        import transformers

        model = transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8))
        with prune(model, pruning_zoo.get_strategy("none"), 1.0):
            pass


class VisionSpy(PruningStrategy):
    """Test strategy: a pre-LLM stage that records every vision observation of every image."""

    name = "vision-spy"
    budget_meaning = BudgetMeaning.ENTERING_LLM
    observes = frozenset({"vision_attention", "vision_keys", "vision_features", "vision_project"})

    def __init__(self, params=None):
        super().__init__(params)
        self.seen = []

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        features = ctx.observe("vision_features")
        seen = {
            "attention": ctx.observe("vision_attention", layer=-2),
            "keys": ctx.observe("vision_keys", layer=-2),
            "features": features,
            "projected": ctx.observe("vision_project", features=features),
            "tokens": ctx.tokens,
        }
        if "vision_cls_features" in ctx.observations:
            seen["cls"] = ctx.observe("vision_cls_features")
        self.seen.append(seen)
        return seen["attention"].sum(0)


def observe_vision(model, inputs, budget=2):
    spy = VisionSpy()
    with torch.no_grad(), prune(model, spy, budget):
        model(**inputs)
    return spy.seen


def test_llava_vision_observations_equal_eager_clip():
    """LLaVA: CLS attention, keys and features at vision_feature_layer -2, as eager CLIP computes them."""
    import tiny_models

    family = tiny_models.FAMILIES["llava"]
    torch.manual_seed(0)
    model = family.model_class(family.config()).eval()
    inputs = family.inputs(2)
    seen = observe_vision(model, inputs)
    with torch.no_grad():
        tower = model.model.vision_tower
        tower.set_attn_implementation("eager")
        outputs = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        block = tower.encoder.layers[-2]
        expected_keys = block.self_attn.k_proj(block.layer_norm1(outputs.hidden_states[-3]))
    for image, observed in enumerate(seen):
        torch.testing.assert_close(observed["attention"], outputs.attentions[-2][image, :, 0, 1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(observed["keys"].flatten(1), expected_keys[image, 1:])
        torch.testing.assert_close(observed["features"], outputs.hidden_states[-2][image, 1:])
        torch.testing.assert_close(observed["cls"], outputs.hidden_states[-2][image, 0])
        torch.testing.assert_close(observed["projected"], observed["tokens"])  # the projector gives the LLM's embeddings

    class Deep(VisionSpy):
        def score(self, ctx):
            return ctx.observe("vision_attention", layer=9)[0]

    with pytest.raises(pruning_zoo.PruningZooError, match="vision layer 9 names no CLIP block"), torch.no_grad():
        with prune(model, Deep(), 4):
            model(**inputs)


def test_llava_next_vision_observations_follow_the_packed_tokens(tmp_path):
    """LLaVA-NeXT: every packed token points at its crop's patch (the projector of its features gives the
    model's own packed embedding), newline tokens get no CLS attention, and the base crop's tokens carry their
    crop's CLS attention as eager CLIP computes it."""
    import tiny_models

    family = tiny_models.FAMILIES["llava_next"]
    model = family.build(tmp_path)
    inputs = family.inputs(2)
    seen = observe_vision(model, inputs)
    newline = model.model.image_newline
    with torch.no_grad():
        tower = model.model.vision_tower
        tower.set_attn_implementation("eager")
        crops = [pixels[:count] for pixels, count in zip(inputs["pixel_values"], (3, 5))]
        outputs = tower(torch.cat(crops), output_attentions=True)
    first_crop = [0, 3]
    patches = 4
    for image, observed in enumerate(seen):
        is_newline = (observed["tokens"] == newline).all(-1)
        assert int(is_newline.sum()) == (2 if image == 0 else 4)  # one per row of the high-resolution grid
        torch.testing.assert_close(observed["projected"][~is_newline], observed["tokens"][~is_newline])
        assert bool((observed["attention"][:, is_newline] == 0).all())
        base = outputs.attentions[-2][first_crop[image], :, 0, 1:]
        torch.testing.assert_close(observed["attention"][:, :patches], base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_observations_follow_the_merged_tokens(name, dtype, tmp_path):
    """Qwen2-VL and Qwen2.5-VL: each token's features are its merge unit's four patch rows (the merger of them
    gives the model's own image embedding, so Qwen2.5-VL's window order is undone), and the attention each
    unit receives in block -2, recomputed here from the block's input with transformers' own rotary code (in
    bf16 it rounds the rotated q and k to bf16), per attention segment, from fp32 scores."""
    import tiny_models

    family = tiny_models.FAMILIES[name]
    model = family.build(tmp_path).to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in family.inputs(2).items()}
    block_input = {}

    def keep(module, args, kwargs):
        block_input.update(hidden=args[0] if args else kwargs["hidden_states"], **kwargs)

    handle = model.model.visual.blocks[-2].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        seen = observe_vision(model, inputs)
    finally:
        handle.remove()
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb_vision"])
    block = model.model.visual.blocks[-2]
    with torch.no_grad():
        hidden = block.norm1(block_input["hidden"])
        q, k, _ = block.attn.qkv(hidden).view(hidden.shape[0], 3, block.attn.num_heads, -1).unbind(1)
        q, k = module.apply_rotary_pos_emb_vision(q, k, *block_input["position_embeddings"])
        assert q.dtype == dtype
        received = torch.zeros(block.attn.num_heads, hidden.shape[0])
        bounds = block_input["cu_seqlens"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k[start:end].float()) * block.attn.scaling
            received[:, start:end] = scores.softmax(-1).mean(1)
        per_unit = received.view(block.attn.num_heads, -1, 4).mean(-1)  # in the blocks' (window) order
    units = [16, 24]
    for image, observed in enumerate(seen):
        torch.testing.assert_close(observed["projected"], observed["tokens"])
        assert observed["features"].shape == (units[image], 4, block.norm1.weight.shape[0])
        assert observed["attention"].dtype == torch.float32
        in_block_order = per_unit[:, sum(units[:image]) : sum(units[: image + 1])]
        # The same values; Qwen2.5-VL's blocks hold them in window order.
        # Relative: the probabilities are about 1/16, and in bf16 q and k left unrounded moved them by 3e-6-5e-6.
        close = dict(rtol=1e-6, atol=0.0)
        torch.testing.assert_close(observed["attention"].sort(-1).values, in_block_order.sort(-1).values, **close)
        if family.name == "qwen2_vl":
            torch.testing.assert_close(observed["attention"], in_block_order, **close)


def test_sublayer_summaries_see_the_residual_stream_and_follow_the_survivors(family_model):
    """The sub-blocks a strategy summarizes agree with the hidden states the unpruned model reports
    (h_next = h + attn_out + mlp_out, mlp_in = norm(h + attn_out)); only the layers it names are watched, each
    summarized once for the batch; a stage reads each image's tokens as rows of the summarized layer's sequence."""
    family, model = family_model
    inputs = family.inputs(3)
    seen, summarized = [], []

    class Spy(Progressive):
        observes = frozenset({"sublayer_summary"})

        def plan(self, budget, num_visual, num_layers):
            return (Stage(after_layer=1, keep=budget), Stage(after_layer=2, keep=budget - 1))

        def sublayer_layers(self, num_layers):
            return range(1, 3)

        def summarize_sublayers(self, io):
            summarized.append(io)
            # each position's place in the layer's own sequence
            return torch.arange(io.valid.shape[1], dtype=torch.float).expand(io.valid.shape[0], -1)

        def score(self, ctx):
            layers = [1] if ctx.stage.after_layer == 1 else [1, 2]
            seen.append((ctx.stage.after_layer, [ctx.observe("sublayer_summary", layer=layer) for layer in layers]))
            return ctx.tokens.float().sum(-1)

    with torch.no_grad():
        with prune(model, Spy(), 3):
            model(**inputs)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert len(summarized) == 2  # layers 1 and 2, once each for the whole batch
    io, layer = summarized[0], model.model.language_model.layers[1]
    valid = io.valid
    torch.testing.assert_close(io.attn_in[valid], layer.input_layernorm(hidden[1])[valid])
    torch.testing.assert_close(io.mlp_in[valid], layer.post_attention_layernorm(hidden[1] + io.attn_out)[valid])
    torch.testing.assert_close((hidden[1] + io.attn_out + io.mlp_out)[valid], hidden[2][valid], rtol=1e-4, atol=1e-5)
    assert summarized[1].attn_in.shape[1] < io.attn_in.shape[1]  # layer 2 ran after the first prune
    image = inputs["input_ids"] == model.config.image_token_id
    first = [rows for stage, (rows,) in ((s, r) for s, r in seen if s == 1)]
    later = [rows for stage, rows in seen if stage == 2]
    assert len(first) == len(later) == image.shape[0]
    for sample, (at_first, (early, current)) in enumerate(zip(first, later)):
        assert torch.equal(at_first.long(), image[sample].nonzero().flatten())
        assert early.numel() == current.numel() == 3  # survivors of stage 1
        assert set(early.long().tolist()) <= set(at_first.long().tolist()) and bool((early.diff() > 0).all())
        assert bool((current.diff() > 0).all()) and bool((current < summarized[1].attn_in.shape[1]).all())


class KeepFirst(PruningStrategy):
    """Test strategy: before the LLM, keep the image's first `budget` tokens (a raster-order prefix)."""

    name = "keep-first"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        return -torch.arange(ctx.tokens.shape[0], dtype=torch.float)


def positions_entering_the_llm(model, inputs, strategy, budget):
    seen = {}

    def spy(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    with torch.no_grad(), prune(model, strategy, budget):
        handle = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    return seen["positions"]


@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl"])
def test_renumbered_positions_follow_the_family_rule(family_name, tmp_path):
    """1-D positions become contiguous; M-RoPE keeps the kept tokens' (t, h, w) and moves the text after the
    image down by the span the image lost: keeping the first 4 of a 4x4 merged grid (one row) spans the same
    width, keeping 6 (a row and a half) too, but keeping 2 drops the span from 4 to 2."""
    import tiny_models

    family = tiny_models.FAMILIES[family_name]
    model = family.build(tmp_path)
    inputs = family.inputs(1)
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    full = positions_entering_the_llm(model, inputs, pruning_zoo.get_strategy("none"), 1.0)
    if family_name == "llava":
        renumbered = positions_entering_the_llm(model, inputs, KeepFirst(), 5)
        length = inputs["input_ids"].shape[1]
        assert full is None  # LLaVA counts 0..L-1 itself when not given positions
        assert renumbered.tolist() == [list(range(length - (image.numel() - 5)))]
        kept = positions_entering_the_llm(model, inputs, KeepFirst({"positions": "keep"}), 5)
        assert kept[0, -1] == length - 1 and kept[0, int(image[0]) + 5] == int(image[-1]) + 1
        return
    first, last = int(image[0]), int(image[-1])
    for budget, gap in [(4, 0), (6, 0), (2, 2)]:
        renumbered = positions_entering_the_llm(model, inputs, KeepFirst(), budget)
        assert torch.equal(renumbered[:, 0, : first + budget], full[:, 0, : first + budget])
        assert torch.equal(renumbered[:, 0, first + budget :], full[:, 0, last + 1 :] - gap), budget


def test_a_keyed_random_draw_follows_the_document_not_the_batch(family_model):
    family, model = family_model
    if family.name != "llava":
        pytest.skip("the draw does not depend on the family")
    strategy = pruning_zoo.get_strategy("random")
    with torch.no_grad(), prune(model, strategy, 8, sample_keys=["t/0", "t/1"]) as pair:
        model(**family.inputs(2))
    with torch.no_grad(), prune(model, strategy, 8, sample_keys=["t/1"]) as alone:
        model(**family.inputs(1))
    with torch.no_grad(), prune(model, strategy, 8, sample_keys=["t/0"]) as other:
        model(**family.inputs(1))
    assert alone.records[0].images[0].kept == pair.records[0].images[1].kept
    assert other.records[0].images[0].kept == pair.records[0].images[0].kept
    assert alone.records[0].images[0].kept != other.records[0].images[0].kept
    with pytest.raises(pruning_zoo.errors.PruningZooError, match="sample keys"):
        with torch.no_grad(), prune(model, strategy, 8, sample_keys=["t/0"]):
            model(**family.inputs(2))


@pytest.mark.parametrize("name", ["fastv", "transprune", "learnpruner", "visionzip", "pool", "random"])
def test_a_batch_selected_at_once_keeps_what_one_image_at_a_time_keeps(family_model, name):
    """Strategies that stack a stage's images (select_images) keep the tokens the per-image default keeps,
    and merge them alike (the logits agree)."""
    family, model = family_model
    inputs = family.inputs(3)
    kept, logits = [], []
    for one_by_one in (False, True):
        strategy = pruning_zoo.get_strategy(name)
        if one_by_one:
            strategy.select_images = functools.partial(PruningStrategy.select_images, strategy)
        budget = 2 if name == "transprune" else 4  # TransPrune's three stages (at 4 only the last drops any)
        with torch.no_grad(), prune(model, strategy, budget) as run:
            logits.append(model(**inputs).logits[:, -1])
        kept.append([image.kept for image in run.records[0].images])
    assert kept[0] == kept[1] and len(kept[0]) >= 3
    torch.testing.assert_close(logits[0], logits[1])


def test_only_the_summarized_layers_are_watched_and_let_go(family_model):
    """TransPrune on a 4-layer model prunes after layers 0, 1 and 2 and accumulates TTV over them (as the 32-layer
    code does from the first prune layer to the last): only their sub-blocks are hooked (4 hooks each), and after
    the forward their tensors are gone, their summaries kept."""
    family, model = family_model
    strategy = pruning_zoo.get_strategy("transprune")
    assert list(strategy.sublayer_layers(4)) == [0, 1, 2]
    with torch.no_grad():
        model(**family.inputs(2))  # transformers installs its own output-capturing hooks on a first forward
    before = _count_hooks(model)
    with torch.no_grad(), prune(model, strategy, 4) as run:
        pruning_hooks = _count_hooks(model) - before
        model(**family.inputs(2))
        assert run._sublayers == {} and sorted(run._summaries) == [0, 1, 2]
    with torch.no_grad(), prune(model, pruning_zoo.get_strategy("fastv"), 4):
        assert _count_hooks(model) - before == pruning_hooks - 3 * 4  # fastv watches no sub-blocks


@pytest.mark.parametrize("name, budget", [("transprune", 4), ("learnpruner", 8)])
def test_a_stage_keeping_every_token_is_left_out_and_changes_nothing(family_model, name, budget):
    """At these budgets TransPrune's first stages, and LearnPruner's stage before the LLM, would keep every
    token (16 or 24): their plans leave them out. Put back, they keep the same tokens and give the same logits."""
    family, model = family_model
    inputs = family.inputs(2)
    runs, put_back_stages = [], []
    for put_back in (False, True):
        strategy = pruning_zoo.get_strategy(name)
        planned = strategy.plan

        def plan(budget, num_visual, num_layers, planned=planned):
            stages = planned(budget, num_visual, num_layers)
            assert stages[0].keep < num_visual
            if name == "learnpruner":
                idle = [Stage(None, num_visual)] if stages[0].in_llm else []
            else:
                idle = [Stage(layer, num_visual) for layer in (0, 1) if layer < stages[0].after_layer]
            put_back_stages.extend(idle)
            return tuple(idle) + stages

        if put_back:
            strategy.plan = plan
        with torch.no_grad(), prune(model, strategy, budget) as run:
            runs.append((model(**inputs).logits[:, -1], [image.kept for image in run.records[0].images]))
    assert put_back_stages
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
