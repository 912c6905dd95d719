"""VisPruner: the selection rule on hand-made tokens, against eager CLIP on a tiny LLaVA, its parameters, and the
engine's guarantees (keep-all, cached generation) for it."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from pruning_zoo.strategies.vispruner import remove_duplicates
from test_methods import Recording as SelectionRecording

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage


def unit(*values: float) -> list[float]:
    vector = torch.tensor(values, dtype=torch.float32)
    return (vector / vector.norm()).tolist()


E1, E2, E3, E4 = unit(1, 0, 0, 0), unit(0, 1, 0, 0), unit(0, 0, 1, 0), unit(0, 0, 0, 1)


def test_duplicate_removal_drops_the_even_places_most_similar_to_the_odd_ones():
    # Residual order 0..5: A = 0, 2, 4 (even places), B = 1, 3, 5. Token 0 duplicates 1, token 2 nearly duplicates 3,
    # token 4 is like no B token. Keeping 4 of 6 drops the two most similar A tokens in one round.
    features = torch.tensor([[E1, E1, unit(0, 1, 0, 0.1), E2, E4, E3]])
    residual = torch.arange(6)[None]
    assert remove_duplicates(features, residual, 4, per_round=8).tolist() == [[4, 1, 3, 5]]
    # One drop per round: round 1 drops 0 and leaves [2, 4 (A by descending similarity), 1, 3, 5]; round 2 splits
    # that into A = 2, 1, 5 and B = 4, 3, drops 2 (0.995 to 3) and leaves [1, 5, 4, 3].
    assert remove_duplicates(features, residual, 4, per_round=1).tolist() == [[1, 5, 4, 3]]
    assert remove_duplicates(features, residual, 0, per_round=8).shape == (1, 0)


def hand_made_context(attention: torch.Tensor, features: torch.Tensor, keep: int) -> ScoreContext:
    return ScoreContext(
        stage=Stage(after_layer=None, keep=keep), tokens=torch.zeros(features.shape[0], 3), num_layers=2,
        observations={"vision_attention": lambda layer=-2: attention, "vision_features": lambda: features})


def test_vispruner_keeps_the_top_attended_then_the_diverse_tokens():
    # Head-mean attention ranks 0, 2 (important at 4 tokens x 0.5), then 4, 5, 6, then 1, 3, 7 (stable order).
    mean = torch.tensor([0.30, 0.05, 0.25, 0.05, 0.10, 0.10, 0.10, 0.05])
    attention = torch.stack([mean * 2, mean * 0])  # two heads, averaged
    # Residual [4, 5, 6, 1, 3, 7] down to 2: round 1 drops all of A = 4, 6, 3 (3 <= 8 and 6 - 2 = 4) and leaves
    # B = [5, 1, 7]; round 2 has A = 5, 7 and B = 1; 5 duplicates 1, so it goes: the diverse tokens are 7 and 1.
    features = torch.tensor([E3, E1, E4, E2, E2, E1, E3, unit(0, 1, 1, 0)])
    strategy = pruning_zoo.get_strategy("vispruner")
    ctx = hand_made_context(attention, features, 4)
    assert strategy.select(strategy.score(ctx), 4, ctx).keep.tolist() == [0, 1, 2, 7]
    # The batched path gives every image the same as alone.
    assert [s.keep.tolist() for s in strategy.select_images([ctx, ctx])] == [[0, 1, 2, 7]] * 2
    # All important: the top four by attention, ties kept in order.
    everything = pruning_zoo.get_strategy("vispruner", important_ratio=1.0)
    assert everything.select(everything.score(ctx), 4, ctx).keep.tolist() == [0, 2, 4, 5]


def test_vispruner_splits_the_budget_as_the_code():
    # important = int(budget * ratio), diverse = the rest (README: 128 at 0.5 is 64 + 64; 64 at 0.75 is 48 + 16).
    for budget, ratio, important in [(128, 0.5, 64), (64, 0.75, 48), (7, 0.5, 3)]:
        ranked = torch.arange(200.0).flip(0)[None]  # token 0 scores highest
        features = torch.randn(1, 200, 4)
        strategy = pruning_zoo.get_strategy("vispruner", important_ratio=ratio)
        ctx = hand_made_context(ranked.expand(2, -1), features[0], budget)
        kept = strategy.select(strategy.score(ctx), budget, ctx).keep
        assert kept.numel() == budget and kept[:important].tolist() == list(range(important))


def test_vispruner_on_llava_reads_eager_clip_block_minus_2(tmp_path):
    """The important tokens are the top head-mean CLS attention of eager CLIP's attentions[-2]."""
    family = tiny_models.FAMILIES["llava"]
    model = family.build(tmp_path)
    inputs = family.inputs(2)
    strategy = pruning_zoo.get_strategy("vispruner", important_ratio=1.0)
    recording = SelectionRecording(strategy)
    with torch.no_grad(), prune(model, strategy, 6):
        model(**inputs)
        tower = model.model.vision_tower
        tower.set_attn_implementation("eager")
        outputs = tower(inputs["pixel_values"], output_attentions=True)
        tower.set_attn_implementation("sdpa")
    for image, (_, selection) in enumerate(recording.selections):
        expected = torch.topk(outputs.attentions[-2][image, :, 0, 1:].mean(0), 6).indices.sort().values
        assert torch.equal(selection.keep, expected)


@pytest.mark.parametrize("values", [{"important_ratio": 1.5}, {"important_ratio": -0.1}, {"drop_per_round": 0}])
def test_vispruner_refuses_parameters_out_of_bounds(values):
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("vispruner", **values)
