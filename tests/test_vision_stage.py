"""Stages inside the vision tower (`Stage(vision_block=j)`), with ToMe: the tower really runs fewer rows after block
j, an identity merge and keep-all are exact, each merge group enters the LLM as one token, generation with the
cache equals recomputing, the segmented prefill (fused too) agrees, and families without the stage refuse it."""

from __future__ import annotations

import pytest
import tiny_models
import torch
import transformers

import pruning_zoo
from pruning_zoo.bench.forwards import attached
from pruning_zoo.bench.segmented import SegmentedPrefill
from pruning_zoo.engine.run import prune
from pruning_zoo.engine.vision_stages import TowerImage, VisionStages
from pruning_zoo.errors import StrategyOutputError
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Selection, Stage

SUPPORTED = ("llava", "qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=SUPPORTED)
def model(request, tmp_path_factory):
    family = tiny_models.FAMILIES[request.param]
    return family, family.build(tmp_path_factory.mktemp(request.param))


def blocks_of(model):
    return model.model.visual.blocks if hasattr(model.model, "visual") else model.model.vision_tower.encoder.layers


class IdentityMerge(PruningStrategy):
    """A stage after vision block 0 that keeps every unit, each its own group: the tower must compute as unpruned."""

    name = "identity-merge"
    budget_meaning = BudgetMeaning.ENTERING_LLM
    plans_vision = True

    def plan(self, budget, num_visual, num_layers, vision_blocks=None):
        return (Stage(None, num_visual, vision_block=0),)

    def score(self, ctx):
        return torch.zeros(ctx.tokens.shape[0])

    def select_images(self, contexts):
        return [Selection(keep=torch.arange(ctx.stage.keep), into=torch.arange(ctx.stage.keep)) for ctx in contexts]


def test_the_size_weighted_average_of_a_merge():
    """Units [1], [3], [5] of sizes 1, 1, 2; the first two merge: (1 + 3) / 2 = 2 of size 2, and 5 of size 2."""
    image = TowerImage(0, 3, (), torch.arange(3), torch.arange(3), torch.tensor([1.0, 1.0, 2.0]))
    stage = Stage(None, 2, vision_block=0)
    merged = VisionStages._apply(image, stage, Selection(keep=torch.tensor([1, 2]), into=torch.tensor([0, 0, 1])),
                                 torch.tensor([[[1.0]], [[3.0]], [[5.0]]]))
    assert merged.flatten().tolist() == [2.0, 5.0]
    assert image.sizes.tolist() == [2.0, 2.0] and image.origin.tolist() == [1, 2] and image.group.tolist() == [0, 0, 1]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_keep_all_and_an_identity_merge_are_the_unpruned_model(model, batch_size):
    family, vlm = model
    inputs = family.inputs(batch_size)
    with torch.no_grad():
        reference = vlm(**inputs).logits
        with prune(vlm, pruning_zoo.get_strategy("tome"), 1.0) as run:
            assert torch.equal(vlm(**inputs).logits, reference)
        assert run.records[0].images[0].vision_units == []
        with prune(vlm, IdentityMerge(), 1.0) as run:
            assert torch.equal(vlm(**inputs).logits, reference)
    assert run.records[0].images[0].vision_units[0] == run.records[0].images[0].num_visual


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_tower_runs_fewer_rows_after_the_stage(model, batch_size):
    family, vlm = model
    inputs = family.inputs(batch_size)
    rows = []
    with torch.no_grad(), prune(vlm, pruning_zoo.get_strategy("tome"), 4) as run:
        # after the engine's hooks: what each block's forward receives
        with attached([block.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2])) for block in blocks_of(vlm)]):
            vlm(**inputs)
    (record,) = run.records
    counts = [image.num_visual for image in record.images]
    if family.name == "llava":  # [B, 1 + patches, d]: block 0 on every patch, the later ones on 4 per image
        assert rows == [1 + 16, 1 + 4, 1 + 4]
    else:  # every image's rows in one sequence, 4 rows per merge unit
        assert rows == [4 * sum(counts), 4 * 4 * batch_size]
    for image in record.images:
        assert image.entering_llm == 4 and image.vision_units[:2] == [image.num_visual, 4]
        assert image.vision_flops < prune_free_flops(vlm, family, batch_size, record.images.index(image))


def prune_free_flops(vlm, family, batch_size, index):
    with torch.no_grad(), prune(vlm, pruning_zoo.get_strategy("none"), 1.0) as run:
        vlm(**family.inputs(batch_size))
    return run.records[0].images[index].vision_flops


def test_each_merge_group_enters_the_llm_as_one_token(model):
    """After the tower every original unit holds its group's features; the LLM gets one token per group, the
    group's kept unit (recorded in `kept`), in original order."""
    family, vlm = model
    inputs = family.inputs(2)
    seen = {}

    def read(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    strategy = pruning_zoo.get_strategy("tome")
    with torch.no_grad(), prune(vlm, strategy, 5) as run:
        with attached([vlm.model.language_model.register_forward_pre_hook(read, with_kwargs=True)]):
            vlm(**inputs)
    for image in run.records[0].images:
        assert len(image.kept) == 5 and image.kept == sorted(image.kept)
    groups = run._tower.images
    # the group's kept unit, as a visual token (Qwen2.5-VL's tower sees units in window order)
    assert [run._tower.entry_selection(i).keep.tolist() for i in range(len(groups))] == [image.kept for image in run.records[0].images]
    for tower_image in groups:  # each group holds its kept unit, and the sizes add up to the image's units
        assert torch.equal(tower_image.group[tower_image.origin], torch.arange(5))
        assert float(tower_image.sizes.sum()) == tower_image.units


def test_proportional_attention_reaches_the_clip_blocks(tmp_path):
    family = tiny_models.FAMILIES["llava"]
    vlm = family.build(tmp_path)
    inputs = family.inputs(2)
    masks, logits = [], {}
    block = vlm.model.vision_tower.encoder.layers[1]
    with torch.no_grad():
        for prop in (True, False):
            with prune(vlm, pruning_zoo.get_strategy("tome", prop_attn=prop), 6):
                with attached([block.register_forward_pre_hook(lambda m, args: masks.append(args[1]))]):
                    logits[prop] = vlm(**inputs).logits
    with_sizes, without = masks
    assert without is None and with_sizes.shape == (2, 1, 1, 1 + 6) and bool((with_sizes[..., 0] == 0).all())
    assert bool((with_sizes[..., 1:] > 0).any())  # log(size) > 0 where a group holds several patches
    assert not torch.equal(logits[True], logits[False])


def replaying_in_llm(strategy):
    """The strategy, with its in-LLM selections of the first forward replayed at every later one (a recomputation
    without the cache must drop what the cached prefill dropped; its tower merges are the same by themselves)."""
    recorded = []
    select = strategy.select_images

    def select_images(contexts):
        if contexts and contexts[0].stage.in_llm:
            if len(recorded) < 1:
                recorded.append(select(contexts))
            return recorded[0]
        return select(contexts)

    strategy.select_images = select_images
    return strategy


@pytest.mark.parametrize("params, budget", [({}, 6), ({"fastv_k": 1}, 8)], ids=["tome", "tome-fastv"])
def test_cached_generation_equals_recomputing_the_pruned_sequence(model, params, budget):
    from test_engine import STEPS, _steps_until_eos, greedy, recompute_without_cache

    family, vlm = model
    inputs = family.inputs(3)
    with torch.no_grad():
        strategy = replaying_in_llm(pruning_zoo.get_strategy("tome", **params))
        with prune(vlm, strategy, budget) as run:
            generated = vlm.generate(**inputs, generation_config=greedy(vlm), output_logits=True, return_dict_in_generate=True)
        tokens, logits = recompute_without_cache(vlm, family, inputs, strategy, budget, STEPS)
    assert len(run.records) == 1
    cached_tokens, cached_logits = generated.sequences[:, -STEPS:], torch.stack(generated.logits, 1)
    for row in range(cached_tokens.shape[0]):
        steps = _steps_until_eos(cached_tokens[row], vlm.generation_config.eos_token_id)
        assert torch.equal(cached_tokens[row, :steps], tokens[row, :steps])
        torch.testing.assert_close(cached_logits[row, :steps], logits[row, :steps], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion", [None, "aot_eager"])
def test_the_segmented_prefill_merges_as_the_engine_does(model, fusion):
    from test_segmented import UNIFORM

    family, vlm = model
    inputs = UNIFORM[family.name](2)
    with torch.no_grad(), prune(vlm, pruning_zoo.get_strategy("tome", fastv_k=1), 6) as run:
        expected = vlm(**inputs).logits[:, -1]
    torch._dynamo.reset()
    segmented = SegmentedPrefill(vlm, pruning_zoo.get_strategy("tome", fastv_k=1), 6, inputs, fusion=fusion)
    for _ in range(2):  # the second run without the first run's checks, as a replay
        segmented.run()
        torch.testing.assert_close(segmented.logits, expected, atol=1e-5, rtol=1e-4)
    assert segmented.visual_per_layer() == run.records[0].images[0].kept_per_layer
    assert [image.origin.tolist() for image in segmented.tower.images] == [image.origin.tolist() for image in run._tower.images]


def test_families_without_the_stage_refuse_it_clearly(tmp_path):
    family = tiny_models.FAMILIES["llava_next"]
    vlm = family.build(tmp_path)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="no stage inside its vision tower"):
        with torch.no_grad(), prune(vlm, pruning_zoo.get_strategy("tome"), 4):
            vlm(**family.inputs(1))


def windowed_qwen2_5_vl():
    """A tiny Qwen2.5-VL whose blocks 0 and 1 attend within windows (2x2 units each: an 8x8 patch grid has 4) and
    block 2 over the image: a stage after block 0 merges within windows, one after block 1 across them."""
    config = tiny_models.qwen2_5_vl_config()
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 3, [2]
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def test_qwen2_5_vl_merges_within_its_windows_until_the_last_windowed_block():
    from test_segmented import UNIFORM

    vlm = windowed_qwen2_5_vl()
    inputs = UNIFORM["qwen2_5_vl"](2)
    strategy = pruning_zoo.get_strategy("tome")
    assert [(s.vision_block, s.keep) for s in strategy.plan(8, 16, 4, vision_blocks=3)] == [(0, 12), (1, 8)]
    seen = {}
    with torch.no_grad():
        reference = vlm(**inputs).logits
        with prune(vlm, IdentityMerge(), 1.0):  # within windows, merging nothing: the unpruned model
            assert torch.equal(vlm(**inputs).logits, reference)
        with prune(vlm, strategy, 8) as run:
            hooks = [block.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, kwargs["cu_seqlens"]),
                                                     with_kwargs=True) for i, block in enumerate(vlm.model.visual.blocks)]
            with attached(hooks):
                logits = vlm(**inputs).logits
    assert torch.isfinite(logits).all() and [image.entering_llm for image in run.records[0].images] == [8, 8]
    # Block 1 attends within the 4 windows of each image, each now 3 units (12 rows); block 2 over each image's 8 units.
    assert seen[1].tolist() == list(range(0, 8 * 12 + 1, 12)) and seen[2].tolist() == [0, 32, 64]
    for tower_image in run._tower.images:  # the windows kept 3 units each: no group spans two windows' tokens
        assert tower_image.windows == [8]
    # The segmented prefill gives the engine's logits (windows, reverse index and all).
    segmented = SegmentedPrefill(vlm, pruning_zoo.get_strategy("tome"), 8, inputs)
    segmented.run()
    torch.testing.assert_close(segmented.logits, logits[:, -1], atol=1e-5, rtol=1e-4)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="at least one token per window"):
        with torch.no_grad(), prune(vlm, pruning_zoo.get_strategy("tome", inflection=-1.0), 2):
            vlm(**inputs)  # the decreasing schedule merges all 14 after block 0: 2 tokens left for 4 windows


class BadMerge(IdentityMerge):
    name = "bad-merge"

    def plan(self, budget, num_visual, num_layers, vision_blocks=None):
        return (Stage(None, budget, vision_block=0),)

    def select_images(self, contexts):
        return [Selection(keep=torch.arange(ctx.stage.keep)) for ctx in contexts]  # no `into`


def test_a_merge_without_targets_and_a_plan_outside_the_tower_are_clear_errors(tmp_path):
    family = tiny_models.FAMILIES["llava"]
    vlm = family.build(tmp_path)
    with pytest.raises(StrategyOutputError, match="must merge after vision block 0: keep 4 through `into`"):
        with torch.no_grad(), prune(vlm, BadMerge(), 4):
            vlm(**family.inputs(1))
    outside = BadMerge()
    outside.plan = lambda budget, num_visual, num_layers, vision_blocks=None: (Stage(None, budget, vision_block=1),)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="outside this model's blocks 0..0"):
        with torch.no_grad(), prune(vlm, outside, 4):
            vlm(**family.inputs(1))
    both = BadMerge()
    both.plan = lambda budget, num_visual, num_layers, vision_blocks=None: (Stage(None, 8, vision_block=0), Stage(None, budget))
    with pytest.raises(pruning_zoo.InvalidParameterError, match="the engine's own stage"):
        with torch.no_grad(), prune(vlm, both, 4):
            vlm(**family.inputs(1))
