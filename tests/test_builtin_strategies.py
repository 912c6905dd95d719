"""The built-in strategies' scoring and selection on hand-made tensors (the engine feeds them real ones)."""

import pytest
import torch
import torch.nn.functional as F

import pruning_zoo
from pruning_zoo.strategy import ScoreContext, Stage


def context(tokens, grid=None, keep=4, **observations):
    return ScoreContext(
        stage=Stage(after_layer=None, keep=keep),
        tokens=tokens,
        num_layers=32,
        grid=grid,
        observations={name: (lambda value=value: value) for name, value in observations.items()},
    )


def run(strategy, ctx, keep):
    return strategy.select(strategy.score(ctx), keep, ctx)


def test_none_plans_no_stage():
    assert pruning_zoo.get_strategy("none").plan(64, 576, 32) == ()


def test_random_is_seeded_exact_and_ordered():
    tokens = torch.randn(576, 8)
    first = run(pruning_zoo.get_strategy("random", seed=3), context(tokens), 64).keep
    again = run(pruning_zoo.get_strategy("random", seed=3), context(tokens), 64).keep
    other = run(pruning_zoo.get_strategy("random", seed=4), context(tokens), 64).keep
    assert torch.equal(first, again) and not torch.equal(again, other)
    assert again.numel() == 64 and again.unique().numel() == 64
    assert torch.equal(again, again.sort().values)


def test_pool_averages_square_blocks_of_the_grid():
    tokens = torch.arange(16 * 2, dtype=torch.float32).reshape(16, 2)  # a 4x4 grid, 2 channels
    selection = run(pruning_zoo.get_strategy("pool"), context(tokens, grid=(4, 4)), 4)
    grid = tokens.reshape(4, 4, 2)
    expected = torch.stack([grid[r : r + 2, c : c + 2].reshape(-1, 2).mean(0) for r in (0, 2) for c in (0, 2)])
    assert selection.keep.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(selection.features, expected)


@pytest.mark.parametrize("keep", [1, 5, 32, 128, 192, 576])
def test_pool_honours_any_budget_exactly(keep):
    tokens = torch.randn(576, 3)
    selection = run(pruning_zoo.get_strategy("pool"), context(tokens, grid=(24, 24)), keep)
    assert selection.keep.numel() == keep and selection.features.shape == (keep, 3)


def test_pool_at_full_budget_is_the_identity():
    tokens = torch.randn(576, 3)
    selection = run(pruning_zoo.get_strategy("pool"), context(tokens, grid=(24, 24)), 576)
    torch.testing.assert_close(selection.features, tokens)


def test_pool_without_a_grid_pools_the_sequence():
    tokens = torch.arange(8, dtype=torch.float32)[:, None]
    selection = run(pruning_zoo.get_strategy("pool"), context(tokens), 4)
    assert selection.features[:, 0].tolist() == F.avg_pool1d(tokens.T[None], 2)[0, 0].tolist()


def test_fastv_scores_by_the_head_mean_of_last_token_attention():
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.3, 0.1, 0.2, 0.4]])  # [heads, image tokens]
    fastv = pruning_zoo.get_strategy("fastv")
    ctx = context(torch.zeros(4, 2), last_token_attention=attention)
    torch.testing.assert_close(fastv.score(ctx), torch.tensor([0.2, 0.3, 0.2, 0.2]))
    assert run(fastv, ctx, 1).keep.tolist() == [1]


def test_fastv_received_mean_reads_the_other_observation():
    fastv = pruning_zoo.get_strategy("fastv", score="received_mean")
    ctx = context(torch.zeros(2, 2), received_attention=torch.tensor([[1.0, 3.0]]))
    assert fastv.score(ctx).tolist() == [1.0, 3.0]


def test_fastv_keeps_the_budget_from_layer_k_on():
    fastv = pruning_zoo.get_strategy("fastv", k=2)
    assert fastv.budget_meaning == pruning_zoo.BudgetMeaning.AFTER_PRUNING
    assert fastv.plan(budget=64, num_visual=576, num_layers=32) == (Stage(after_layer=1, keep=64),)
    assert fastv.plan(1, 576, 32) == (Stage(after_layer=1, keep=1),)


def test_fastv_plans_its_drop_after_layer_k_minus_1_from_the_average_budget():
    fastv = pruning_zoo.get_strategy("fastv", k=2, budget_counts="per_layer_average")
    assert fastv.budget_meaning == pruning_zoo.BudgetMeaning.PER_LAYER_AVERAGE
    (stage,) = fastv.plan(budget=64, num_visual=576, num_layers=32)
    assert stage == Stage(after_layer=1, keep=30)  # (2*576 + 30*30) / 32 = 64.1
    assert fastv.plan(576, 576, 32) == ()
    # R = 0.5 as in the paper: keep 288 after layer 1, an average of (2*576 + 30*288)/32 = 306
    assert fastv.plan(306, 576, 32) == (Stage(after_layer=1, keep=288),)


def test_fastv_refuses_budgets_it_cannot_reach():
    with pytest.raises(pruning_zoo.InvalidParameterError, match="lowest reachable average is 36.9"):
        pruning_zoo.get_strategy("fastv", budget_counts="per_layer_average").plan(16, 576, 32)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="fastv.k=32 must be below the model's 32"):
        pruning_zoo.get_strategy("fastv", k=32).plan(64, 576, 32)
