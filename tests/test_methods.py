"""Each method against an independent computation: on a tiny model with eager attention, or on hand-made
tensors where the method is arithmetic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import tiny_models
import torch
from pruning_zoo.strategies.learnpruner import (
    LearnablePruningModule,
    cosine_distances,
    kept_with_diverse,
    max_min_diverse,
)
from pruning_zoo.strategies.transprune import token_transition_variation
from pruning_zoo.strategies.visionzip import merge_contextual

import pruning_zoo
from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.observe import attention_probabilities, rotated_keys
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage, SublayerIO


class Recording:
    """Wraps a strategy's select_images to keep every selection, in call order."""

    def __init__(self, strategy):
        self.strategy, self.selections = strategy, []
        original = strategy.select_images

        def select_images(contexts):
            selections = original(contexts)
            self.selections += [(ctx.stage, selection) for ctx, selection in zip(contexts, selections)]
            return selections

        strategy.select_images = select_images


def eager_outputs(model, inputs, **options):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, **options)
    finally:
        model.set_attn_implementation("sdpa")


# -- FastV -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_fastv_keeps_the_top_last_token_attention_of_eager_layer_k_minus_1(family_model, k):
    family, model = family_model
    inputs = family.inputs(3)
    recording = Recording(pruning_zoo.get_strategy("fastv", k=k))
    with torch.no_grad(), prune(model, recording.strategy, 0.5) as run:
        model(**inputs)
    attentions = eager_outputs(model, inputs, output_attentions=True).attentions
    image = inputs["input_ids"] == model.config.image_token_id
    for sample, (stage, selection) in enumerate(recording.selections):
        assert stage.after_layer == k - 1
        scores = attentions[k - 1][sample, :, -1, image[sample]].float().mean(0)  # last prompt token, head mean
        expected = torch.topk(scores, stage.keep).indices.sort().values
        assert torch.equal(selection.keep, expected)
        assert run.records[0].images[sample].kept_per_layer[k:] == [stage.keep] * (len(attentions) - k)


# -- VisionZip -------------------------------------------------------------------------------------------------
def test_visionzip_splits_the_budget_as_the_readme_and_counts_cls():
    visionzip = pruning_zoo.get_strategy("visionzip")
    assert [visionzip.split(b, with_cls=True) for b in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert visionzip.split(1, with_cls=True) == (1, 0)


def test_visionzip_on_llava_keeps_cls_and_the_top_cls_attended_patches(tmp_path):
    """The dominant patches are the top CLS-attended ones of eager CLIP's block -2 (heads summed); the LLM
    gets the projected CLS, then those patches in order, then the contextual tokens; all 1 + 5 + 2 of them."""
    family = tiny_models.FAMILIES["llava"]
    model = family.build(tmp_path)
    inputs = family.inputs(2)
    strategy = pruning_zoo.get_strategy("visionzip", contextual_ratio=0.25)
    recording = Recording(strategy)
    with torch.no_grad(), prune(model, strategy, 8):
        model(**inputs)
        tower = model.model.vision_tower
        tower.set_attn_implementation("eager")
        outputs = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        projector = model.model.multi_modal_projector
    for image, (_, selection) in enumerate(recording.selections):
        cls_attention = outputs.attentions[-2][image, :, 0, 1:].sum(0)
        dominant = torch.topk(cls_attention, 5).indices.sort().values
        hidden = outputs.hidden_states[-2][image]
        with torch.no_grad():
            expected = projector(torch.cat([hidden[:1], hidden[1 + dominant]]))
        assert selection.keep.numel() == 8
        assert set(dominant.tolist()) <= set(selection.keep.tolist())
        torch.testing.assert_close(selection.features[:6], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family_name, cls_tokens", [("llava", 1), ("qwen2_vl", 0)])
def test_visionzip_records_the_patches_it_kept_and_the_cls_apart(tmp_path, family_name, cls_tokens):
    """CLS takes a free patch slot, but that patch is not kept: the record (what evidence recall reads) holds the
    dominant patches and the contextual targets only, and counts CLS on its own."""
    family = tiny_models.FAMILIES[family_name]
    model = family.build(tmp_path)
    strategy = pruning_zoo.get_strategy("visionzip", contextual_ratio=0.25)
    recording = Recording(strategy)
    with torch.no_grad(), prune(model, strategy, 8) as run:
        model(**family.inputs(2))
    for record, (_, selection) in zip(run.records[0].images, recording.selections):
        lent = set(selection.keep[selection.borrowed].tolist()) if selection.borrowed is not None else set()
        assert len(lent) == cls_tokens and record.non_patch_tokens == cls_tokens
        assert record.kept == sorted(set(selection.keep.tolist()) - lent) and len(record.kept) == 8 - cls_tokens
        assert record.entering_llm == 8  # CLS still enters the LLM


def test_visionzip_merges_each_remaining_token_into_its_most_similar_target():
    # Remaining tokens in order; targets are positions 0 and 2 (step = 4 // 2).
    keys = torch.tensor([[1.0, 0.0], [0.1, 1.0], [0.0, 1.0], [0.9, 0.1]])
    features = torch.tensor([[1.0], [10.0], [100.0], [1000.0]])
    targets, merged = merge_contextual(keys, features, 2, "code")
    assert targets.tolist() == [0, 2]
    # token 1 joins target 2 (cosine), token 3 joins target 0: target + mean of its members
    assert merged[:, 0].tolist() == [1.0 + 1000.0, 100.0 + 10.0]
    _, averaged = merge_contextual(keys, features, 2, "mean")
    assert averaged[:, 0].tolist() == [(1.0 + 1000.0) / 2, (100.0 + 10.0) / 2]


@pytest.mark.parametrize("remaining, count, step", [(523, 10, 52), (469, 23, 20), (415, 13, 31)])
def test_visionzip_targets_are_evenly_strided_over_the_remaining_tokens(remaining, count, step):
    # METHODS.md: |R|=523 with 10 contextual tokens gives step 52 (also 469/23 and 415/13).
    targets, merged = merge_contextual(torch.randn(remaining, 4), torch.randn(remaining, 3), count, "code")
    assert targets.tolist() == [step * i for i in range(count)] and merged.shape == (count, 3)


def test_visionzip_without_cls_ranks_qwen_tokens_by_received_attention(tmp_path):
    family = tiny_models.FAMILIES["qwen2_vl"]
    model = family.build(tmp_path)
    strategy = pruning_zoo.get_strategy("visionzip", contextual_ratio=0.25)
    recording = Recording(strategy)
    seen = []
    original_score = strategy.score
    strategy.score = lambda ctx: seen.append(original_score(ctx)) or seen[-1]
    with torch.no_grad(), prune(model, strategy, 8):
        model(**family.inputs(1))
    (_, selection), scores = recording.selections[0], seen[0]
    dominant = torch.topk(scores, 6).indices  # no CLS: all 6 dominant slots are tokens
    assert set(dominant.tolist()) <= set(selection.keep.tolist()) and selection.keep.numel() == 8


# -- TransPrune ------------------------------------------------------------------------------------------------
def test_transprune_default_schedule_is_the_codes():
    transprune = pruning_zoo.get_strategy("transprune")
    stages = transprune.plan(72, 576, 32)
    assert stages == (Stage(6, 504), Stage(8, 360), Stage(11, 72))  # after layers 7, 9, 12 (1-idx)
    assert list(transprune.ttv_layers(32)) == [6, 7, 8, 9, 10, 11]
    # Scaled to 6 layers, the prunes bump to after 1, 2, 3 (1-indexed) and TTV still runs to the last of them.
    assert transprune.prune_layers(6) == [1, 2, 3] and list(transprune.ttv_layers(6)) == [0, 1, 2]
    assert transprune.prune_layers(16) == [4, 5, 6] and list(transprune.ttv_layers(16)) == [3, 4, 5]
    average = transprune.average([7, 9, 12], [504, 360, 72], 576, 32)
    assert average == 236.25
    by_average = pruning_zoo.get_strategy("transprune", budget_counts="per_layer_average").plan(236, 576, 32)
    counts = [s.keep for s in by_average]
    assert [s.after_layer for s in by_average] == [6, 8, 11] and counts[-1] == 72
    # Counts one below the code's (503, 359) average 236.09: closer to 236 than the code's 236.25.
    assert abs(transprune.average([7, 9, 12], counts, 576, 32) - 236) < 0.25


def test_transprune_scales_to_other_budgets_and_depths():
    transprune = pruning_zoo.get_strategy("transprune")
    assert [s.keep for s in transprune.plan(36, 576, 32)] == [252, 180, 36]
    # At 128 the code's first two stages keep all 576: they are left out, the last stage scores as before.
    assert transprune.plan(128, 576, 32) == (Stage(11, 128),)
    assert [s.after_layer for s in transprune.plan(36, 576, 16)] == [3, 4, 5]  # 7, 9, 12 scaled by 16/32: 4, 5, 6
    assert [s.after_layer for s in transprune.plan(2, 16, 4)] == [0, 1, 2]  # kept distinct
    with pytest.raises(pruning_zoo.InvalidParameterError, match="do not fit a model of 3 decoder layers"):
        transprune.plan(2, 16, 3)


def test_transprune_ttv_on_hand_made_tensors():
    """m = |y|/|x|, c = 1 - cos(x, y), p = softmax(c) over the valid tokens, TTV = m*p (attention + MLP)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, -1.0], [0.0, 0.0]])
    valid = torch.tensor([True, True, True, False])
    magnitude = torch.tensor([2.0, 1.0, 1.0])
    change = torch.tensor([0.0, 2.0, 1.0])
    expected = magnitude * change.softmax(0)
    zero = torch.zeros_like(x)

    def ttv(mlp_out, direction="code"):  # a batch of two copies: each sample on its own
        io = SublayerIO(attn_in=torch.stack([x, x]), attn_out=torch.stack([y, y]), mlp_in=torch.stack([x, x]),
                        mlp_out=torch.stack([mlp_out, mlp_out]), valid=torch.stack([valid, valid]))
        both = token_transition_variation(io, direction)
        assert both.shape == (2, 4) and torch.equal(both[0], both[1]) and both[0, 3] == 0
        return both[0, :3]

    torch.testing.assert_close(ttv(zero), expected)
    torch.testing.assert_close(ttv(y), 2 * expected)
    paper = magnitude * torch.tensor([0.0, 0.0, 1.0]).softmax(0) * 2  # 1 - |cos|
    torch.testing.assert_close(ttv(y, "paper"), paper)
    transprune = pruning_zoo.get_strategy("transprune")
    assert list(transprune.sublayer_layers(32)) == list(range(6, 12))  # TTV over layers 7..12 (1-indexed)


def test_transprune_score_adds_normalised_ttv_and_iga():
    ttv = {6: torch.tensor([0.2, 0.6]), 7: torch.tensor([0.4, 0.4]), 8: torch.tensor([0.2, 0.2])}
    iga = torch.tensor([[0.1, 0.3], [0.3, 0.3]])
    ctx = ScoreContext(stage=Stage(after_layer=6, keep=1), tokens=torch.zeros(2, 3), num_layers=32,
                       observations={"sublayer_summary": lambda layer: ttv[layer], "next_layer_instruction_attention": lambda: iga})
    expected = 0.5 * torch.tensor([0.25, 0.75]) + 0.5 * torch.tensor([0.2, 0.3]) / 0.5  # layer 6 only at the first prune
    torch.testing.assert_close(pruning_zoo.get_strategy("transprune").score(ctx), expected)
    ctx = dataclasses.replace(ctx, stage=Stage(after_layer=8, keep=1))  # layers 6..8 accumulate at the second
    expected = 0.5 * torch.tensor([0.4, 0.6]) + 0.5 * torch.tensor([0.4, 0.6])
    torch.testing.assert_close(pruning_zoo.get_strategy("transprune").score(ctx), expected)


def test_transprune_iga_is_the_next_layers_eager_attention_from_the_instruction(tmp_path):
    """At the first prune (after layer 0 of the tiny model) IGA equals the eager attention of layer 1 from
    the tokens after the image onto the image, averaged over heads and those queries."""
    family = tiny_models.FAMILIES["llava"]
    model = family.build(tmp_path)
    inputs = family.inputs(3)
    strategy = pruning_zoo.get_strategy("transprune")
    seen = []
    original = strategy.scores

    def scores(contexts):
        for ctx in contexts:
            if ctx.stage.after_layer == 0:
                seen.append(ctx.observe("next_layer_instruction_attention").float().mean(0))
        return original(contexts)

    strategy.scores = scores
    with torch.no_grad(), prune(model, strategy, 2):  # 2 of 16: three stages, the first after layer 0
        model(**inputs)
    attentions = eager_outputs(model, inputs, output_attentions=True).attentions
    image = inputs["input_ids"] == model.config.image_token_id
    for sample in range(3):
        after = torch.arange(image.shape[1]) > image[sample].nonzero().max()
        expected = attentions[1][sample][:, after][:, :, image[sample]].float().mean((0, 1))
        torch.testing.assert_close(seen[sample], expected, rtol=1e-4, atol=1e-6)


def test_attention_rows_given_as_a_shared_range_are_the_rows_given_by_index(tmp_path):
    """The instruction rows every sample shares are read in place (a slice); the same rows as indices give the
    same probabilities."""
    model = tiny_models.FAMILIES["llava"].build(tmp_path)
    adapter = adapter_for(model)
    layer = adapter.layers[1]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12, adapter.text_config.hidden_size, generator=generator)
    positions = torch.arange(12)[None].expand(2, -1)
    cos, sin = adapter.rotary_embedding(hidden, positions)
    normed, keys = rotated_keys(layer, hidden, cos, sin)
    valid = torch.ones(2, 12, dtype=torch.bool)
    by_index = attention_probabilities(layer, normed, keys, cos, sin, torch.arange(9, 12).expand(2, -1), valid)
    in_place = attention_probabilities(layer, normed, keys, cos, sin, slice(9, None), valid)
    assert in_place.shape == (2, layer.self_attn.config.num_attention_heads, 3, 12)
    torch.testing.assert_close(in_place, by_index, rtol=0, atol=0)


# -- LearnPruner -----------------------------------------------------------------------------------------------
def test_learnpruner_module_has_the_papers_size_on_clip_l():
    assert sum(p.numel() for p in LearnablePruningModule(1024).parameters()) == 525_826  # about 0.53M


def test_learnpruner_splits_the_budget_three_to_one():
    learnpruner = pruning_zoo.get_strategy("learnpruner")
    assert learnpruner.plan(32, 576, 32) == (Stage(None, 96), Stage(12, 32))
    # 400 before the LLM would leave 576: a first stage keeping every token is left out.
    assert learnpruner.plan(200, 576, 32) == (Stage(12, 200),)
    by_average = pruning_zoo.get_strategy("learnpruner", budget_counts="per_layer_average")
    first, second = by_average.plan(32, 576, 32)
    assert (first.keep, second.keep) == (52, 18) and abs((13 * 52 + 19 * 18) / 32 - 32) < 0.5
    assert [s.after_layer for s in learnpruner.plan(2, 16, 4)] == [None, 2]  # 12 of 32 scaled to 4 layers: 1.5 -> 2


def test_learnpruner_diversity_is_greedy_max_min_cosine():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    # Kept: row 0. Farthest from it is row 3 (distance 2); then row 2 (distance 1 to both rows 0 and 3).
    assert max_min_diverse(features, torch.tensor([0]), 2).tolist() == [3, 2]
    assert max_min_diverse(features, torch.tensor([0]), 0).tolist() == []


def test_learnpruner_diversity_follows_its_definition():
    """Against the definition computed plainly: each pick is the unselected row whose smallest cosine distance
    to the rows selected so far is largest, the first of equals winning. Features are drawn from few values
    so that equal distances, and duplicate rows, occur."""
    generator = torch.Generator().manual_seed(3)
    for case in range(40):
        n = int(torch.randint(3, 30, (1,), generator=generator))
        features = torch.randint(-2, 3, (n, 3), generator=generator).float()
        features[features.norm(dim=1) == 0] = 1.0
        kept = torch.randperm(n, generator=generator)[: int(torch.randint(0, n, (1,), generator=generator))]
        count = n - len(kept) if case % 2 else min(3, n - len(kept))
        distance = cosine_distances(features[None])[0]  # equal distances are equal as computed
        selected, expected = kept.tolist() or [0], [] if len(kept) else [0]
        for _ in range(count - len(expected)):
            nearest = [min(distance[row, s].item() for s in selected) if row not in selected else float("-inf")
                       for row in range(n)]
            best = max(range(n), key=lambda row: (nearest[row], -row))
            selected.append(best)
            expected.append(best)
        assert max_min_diverse(features, kept, count).tolist() == expected, case


def test_learnpruner_keep_probability_is_the_softmax_keep_column_and_the_margin_ranks_as_it():
    torch.manual_seed(0)
    module = LearnablePruningModule(16, hidden=8)
    features = torch.randn(2, 30, 16) * 3
    logits = module(features)
    torch.testing.assert_close(module.keep_probability(features), logits.softmax(dim=-1)[..., 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.keep_margin(features), logits[..., 1] - logits[..., 0], rtol=1e-5, atol=1e-5)
    # A confident module saturates the probability at 1.0 in fp32; the margin still orders the tokens.
    with torch.no_grad():
        module.mlp[2].bias += torch.tensor([-40.0, 40.0])
    assert bool((module.keep_probability(features) == 1.0).all())
    margin = module.keep_margin(features)
    assert margin.unique().numel() == margin.numel()


def test_learnpruner_cosine_distances_are_one_minus_the_normalised_products():
    features = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(4)) * 10
    normed = torch.nn.functional.normalize(features.double(), dim=-1)
    torch.testing.assert_close(cosine_distances(features), 1 - normed @ normed.transpose(1, 2), rtol=0, atol=1e-6,
                               check_dtype=False)
    rounded = features.bfloat16()  # the tower's own dtype: products summed in fp32 all the same
    normed = torch.nn.functional.normalize(rounded.double(), dim=-1)
    distance = cosine_distances(rounded)
    assert distance.dtype == torch.float32
    torch.testing.assert_close(distance, 1 - normed @ normed.transpose(1, 2), rtol=0, atol=1e-6, check_dtype=False)


def test_learnpruner_diversity_of_a_batch_is_each_images_own():
    features = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(0))
    ranked = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(i))[:5] for i in range(3)])
    batched = max_min_diverse(features, ranked, 6)
    assert batched.shape == (3, 6)
    for image in range(3):
        assert batched[image].tolist() == max_min_diverse(features[image], ranked[image], 6).tolist()
    assert max_min_diverse(features, ranked[:, :0], 2).shape == (3, 2)  # nothing ranked: starts from row 0
    assert max_min_diverse(features, ranked[:, :0], 2)[:, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("ranked_count, count", [(5, 6), (5, 0), (0, 3), (0, 1), (39, 1)])
def test_learnpruner_keeps_the_ranked_and_diverse_rows_in_order(ranked_count, count):
    """Read from the greedy's running minimum, the kept rows are the ranked ones and the picks, ascending."""
    features = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(1))
    scores = torch.rand(3, 40, generator=torch.Generator().manual_seed(2))
    ranked = torch.topk(scores, ranked_count).indices
    expected = torch.cat([ranked, max_min_diverse(features, ranked, count)], dim=1).sort(dim=1).values
    assert torch.equal(kept_with_diverse(features, scores, ranked_count, count), expected)
    # The features' own bf16 (as the vision tower gives them) picks the same rows.
    rounded = features.bfloat16()
    expected = torch.cat([ranked, max_min_diverse(rounded.float(), ranked, count)], dim=1).sort(dim=1).values
    assert torch.equal(kept_with_diverse(rounded, scores, ranked_count, count), expected)


def test_learnpruner_selects_a_batch_as_it_selects_each_image():
    strategy = pruning_zoo.get_strategy("learnpruner", seed=2)
    generator = torch.Generator().manual_seed(1)
    contexts = [
        ScoreContext(stage=Stage(after_layer=None, keep=12), tokens=torch.zeros(30, 4), num_layers=4,
                     observations={"vision_features": lambda features=torch.randn(30, 16, generator=generator): features})
        for _ in range(3)
    ]
    batched = strategy.select_images(contexts)
    one_by_one = [strategy.select(strategy.score(ctx), ctx.stage.keep, ctx) for ctx in contexts]
    assert [s.keep.tolist() for s in batched] == [s.keep.tolist() for s in one_by_one]
    assert len({tuple(s.keep.tolist()) for s in batched}) == 3  # the images differ, and so do their picks
    mixed = contexts[:2] + [dataclasses.replace(contexts[2], tokens=torch.zeros(20, 4), observations={
        "vision_features": lambda: torch.randn(20, 16, generator=generator)})]
    assert [s.keep.shape[0] for s in strategy.select_images(mixed)] == [12, 12, 12]  # sizes differ: one by one


def test_learnpruner_ranks_by_the_modules_keep_probability_plus_diverse_tokens(tmp_path):
    family = tiny_models.FAMILIES["llava"]
    model = family.build(tmp_path / "model")
    inputs = family.inputs(1)
    strategy = pruning_zoo.get_strategy("learnpruner", seed=3)
    recording = Recording(strategy)
    features = {}

    def keep_features(module, args):
        features["x"] = args[0][0]

    handle = model.model.multi_modal_projector.register_forward_pre_hook(keep_features)
    try:
        with torch.no_grad(), prune(model, strategy, 4):  # stage 1 keeps 12: 11 ranked + 1 diverse
            model(**inputs)
    finally:
        handle.remove()
    (_, first), _ = recording.selections
    torch.manual_seed(3)
    module = LearnablePruningModule(features["x"].shape[-1])
    with torch.no_grad():
        probability = module(features["x"]).softmax(-1)[:, 1]
    ranked = torch.topk(probability, 11).indices
    diverse = max_min_diverse(features["x"], ranked, 1)
    assert first.keep.tolist() == sorted(ranked.tolist() + diverse.tolist())


def test_learnpruner_loads_its_module_and_refuses_another_models(tmp_path):
    family = tiny_models.FAMILIES["llava"]
    model = family.build(tmp_path / "model")
    copy = type(model).from_pretrained(tmp_path / "model")  # the same weights from another load
    torch.manual_seed(1)
    other = family.model_class(family.config()).eval()
    trained = LearnablePruningModule(32, hidden=8)
    identity = adapter_for(model).identity
    trained.save(tmp_path / "module", identity.name, identity.fingerprint, budget=4, steps=0)
    strategy = pruning_zoo.get_strategy("learnpruner", module=str(tmp_path / "module"))
    with torch.no_grad(), prune(copy, strategy, 4) as run:
        copy(**family.inputs(1))
    assert run.records[0].images[0].kept_per_layer[-1] == 4
    with pytest.raises(pruning_zoo.InvalidParameterError, match="was trained for .*not for this model"):
        with torch.no_grad(), prune(other, pruning_zoo.get_strategy("learnpruner", module=str(tmp_path / "module")), 4):
            other(**family.inputs(1))
    with pytest.raises(pruning_zoo.InvalidParameterError, match="holds no trained module"):
        pruning_zoo.get_strategy("learnpruner", module=str(tmp_path / "nowhere"))


def test_strategy_parameters_come_from_cli_text():
    transprune = pruning_zoo.get_strategy("transprune", prune_layers="[2, 4]", keep_ratios="[0.5, 0.25]")
    assert transprune.params.prune_layers == (2, 4)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="must pair up"):
        pruning_zoo.get_strategy("transprune", prune_layers="[2, 4]")
    assert math.isclose(pruning_zoo.get_strategy("visionzip").params.contextual_ratio, 10 / 64)


def test_divprune_picks_by_max_min_cosine_distance():
    """Six 2-D tokens at known angles, each with its own norm (cosine ignores it): A 0°, B 6°, C 90°, D 178°,
    E 183°, F 270°. Nearest-other distances: A, B 6°; C 84°; D, E 5°; F 87°, so F comes first; then C (180° from F);
    then A (90° from both) over D (88°), E (87°), B (84°); then D, then B (6° from A) over E (5° from D); then E."""
    import math

    from pruning_zoo.strategies.divprune import max_min_order

    angles = [0, 6, 90, 178, 183, 270]
    norms = [1.0, 3.0, 0.5, 2.0, 7.0, 0.2]
    tokens = torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))]
                           for a, r in zip(angles, norms)])
    assert max_min_order(tokens[None], 6)[0].tolist() == [5, 2, 0, 3, 1, 4]
    divprune = pruning_zoo.get_strategy("divprune")
    ctx = ScoreContext(stage=Stage(after_layer=None, keep=3), tokens=tokens, num_layers=4)
    assert divprune.select_images([ctx])[0].keep.tolist() == [0, 2, 5]  # A, C, F in original order
    assert torch.topk(divprune.score(ctx), 3).indices.sort().values.tolist() == [0, 2, 5]  # score agrees
    twice = divprune.select_images([ctx, ScoreContext(stage=ctx.stage, tokens=tokens.flip(0), num_layers=4)])
    assert [s.keep.tolist() for s in twice] == [[0, 2, 5], [0, 3, 5]]  # batched: each image its own picks


def test_divprune_never_picks_a_token_twice_among_duplicates():
    from pruning_zoo.strategies.divprune import max_min_order

    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    order = max_min_order(tokens[None], 4)[0].tolist()
    assert sorted(order) == [0, 1, 2, 3] and order[0] == 3
