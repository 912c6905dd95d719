"""HoloV: crops, the budget's allocation over them and the picks within them on hand-made tokens, against a plain
per-crop transcription of the rule, and the parameters (docs/methods/holov.md)."""

from __future__ import annotations

import pytest
import torch
from pruning_zoo.strategies.holov import crop_index

import pruning_zoo
from pruning_zoo.strategy import ScoreContext, Stage


def context(attention: torch.Tensor, tokens: torch.Tensor, keep: int, grid=None) -> ScoreContext:
    return ScoreContext(stage=Stage(after_layer=None, keep=keep), tokens=tokens, num_layers=2, grid=grid,
                        observations={"vision_attention": lambda layer=-2: torch.stack([attention * 2, attention * 0])})


def picks(strategy, ctx) -> list[int]:
    return strategy.select_images([ctx])[0].keep.tolist()


def test_crops_are_runs_of_the_sequence_or_blocks_of_the_grid():
    crop, count = crop_index(10, 4, None, "sequence", "cpu")  # 10 // 4 = 2, the first 10 % 4 = 2 crops one longer
    assert (crop.tolist(), count) == ([0, 0, 0, 1, 1, 1, 2, 2, 3, 3], 4)
    crop, count = crop_index(16, 4, (4, 4), "grid", "cpu")  # 2 x 2 blocks of a 4 x 4 grid
    assert count == 4 and crop.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    crop, count = crop_index(12, 8, (3, 4), "grid", "cpu")  # 2 x 4 blocks of 3 x 4: rows split 2 + 1
    assert count == 8 and crop.view(3, 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert crop_index(16, 4, None, "grid", "cpu")[0].tolist() == crop_index(16, 4, None, "sequence", "cpu")[0].tolist()
    assert crop_index(3, 16, None, "sequence", "cpu")[1] == 3  # never more crops than tokens


ATTENTION = torch.tensor([0.40, 0.10, 0.30, 0.20, 0.12, 0.05, 0.15, 0.18])
TOKENS = torch.eye(8)  # all orthogonal: every variance is equal


def test_crops_share_the_budget_by_score_and_keep_their_most_attended():
    # Crops 0-3 (mean attention 0.25) and 4-7 (0.125): weights 2/3 and 1/3; 5 tokens floor to 3 + 1 and the one
    # left goes to the first crop: all of crop 0, and crop 1's most attended (7). A global top-5 would be 0, 2, 3, 6, 7.
    strategy = pruning_zoo.get_strategy("holov", crops=2)
    assert picks(strategy, context(ATTENTION, TOKENS, 5)) == [0, 1, 2, 3, 7]
    assert torch.topk(strategy.score(context(ATTENTION, TOKENS, 5)), 5).indices.sort().values.tolist() == [0, 1, 2, 3, 7]
    # Equal variances: the variance term scales every crop score by (1 + alpha), the shares do not move.
    assert picks(pruning_zoo.get_strategy("holov", crops=2, alpha=0.0), context(ATTENTION, TOKENS, 5)) == [0, 1, 2, 3, 7]


def test_a_crop_given_more_than_it_holds_passes_the_rest_to_the_most_attended_left():
    # Crop 1 at mean 0.1: weights 0.714 and 0.286; 6 tokens floor to 4 + 1 and the one left goes to crop 0, which
    # holds 4. The code would lose that slot (and pad a zero token); here it goes to token 4 (0.12), the most
    # attended token not kept.
    attention = torch.tensor([0.40, 0.10, 0.30, 0.20, 0.12, 0.03, 0.10, 0.15])
    assert picks(pruning_zoo.get_strategy("holov", crops=2), context(attention, TOKENS, 6)) == [0, 1, 2, 3, 4, 7]


def reference(attention: torch.Tensor, tokens: torch.Tensor, crops: int, keep: int, alpha: float) -> list[int]:
    """The rule of docs/methods/holov.md, one crop at a time (no overflow in the cases below)."""
    n = tokens.shape[0]
    size, longer = divmod(n, crops)
    bounds, start = [], 0
    for c in range(crops):
        bounds.append((start, start + size + (c < longer)))
        start = bounds[-1][1]
    scores = []
    for lo, hi in bounds:
        a, unit = attention[lo:hi] * 1e3, torch.nn.functional.normalize(tokens[lo:hi], dim=-1)
        m = hi - lo
        s = (unit @ unit.T) * (1 - torch.eye(m))
        mean = s.sum(1) / (m - 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / (m - 1)
        scores.append((a + alpha * var * a.abs().mean() / (var.abs().mean() + 1e-6)).mean())
    weights = torch.stack(scores) / (torch.stack(scores).sum() + 1e-6)
    share = (weights * keep).floor().long()
    for c in torch.sort(weights, descending=True, stable=True).indices[: keep - int(share.sum())]:
        share[c] += 1
    kept = []
    for (lo, hi), k in zip(bounds, share.tolist()):
        kept += (lo + torch.sort(attention[lo:hi], descending=True, stable=True).indices[:k]).tolist()
    return sorted(kept)


@pytest.mark.parametrize("n, crops, keep", [(24, 4, 6), (30, 7, 9), (36, 16, 12)])
def test_the_batched_rule_agrees_with_a_crop_by_crop_transcription(n, crops, keep):
    generator = torch.Generator().manual_seed(n)
    tokens = torch.randn(3, n, 5, generator=generator)
    attention = torch.rand(3, n, generator=generator).softmax(dim=1)
    strategy = pruning_zoo.get_strategy("holov", crops=crops)
    contexts = [context(attention[b], tokens[b], keep) for b in range(3)]
    expected = [reference(attention[b], tokens[b], crops, keep, 0.09) for b in range(3)]
    assert [s.keep.tolist() for s in strategy.select_images(contexts)] == expected  # batched
    assert [picks(strategy, ctx) for ctx in contexts] == expected  # alone


def test_the_default_crop_count_follows_the_qwen_code():
    strategy = pruning_zoo.get_strategy("holov")
    # 1024/576 * 24 / 6 = 7.1 crops of 24 tokens: 7.
    tokens = torch.randn(24, 5, generator=torch.Generator().manual_seed(0))
    attention = torch.rand(24, generator=torch.Generator().manual_seed(1))
    assert picks(strategy, context(attention, tokens, 6)) == reference(attention, tokens, 7, 6, 0.09)


@pytest.mark.parametrize("values", [{"crops": 0}, {"alpha": -0.1}, {"partition": "blocks"}])
def test_holov_refuses_parameters_out_of_bounds(values):
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("holov", **values)
