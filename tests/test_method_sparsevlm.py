"""SparseVLM: the raters, the top-k and the recycling on hand-made tokens, the DPC-KNN merge, the code's schedule
and how budgets map to it, its parameters, and the engine's guarantees (keep-all, cached generation) for it."""

from __future__ import annotations

import pytest
import torch
from pruning_zoo.strategies.sparsevlm import CODE_SCHEDULES, cluster_and_merge
from test_engine import STEPS, Recording, Replay, _steps_until_eos, greedy, recompute_without_cache

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage


def context(rows: torch.Tensor, tokens: torch.Tensor, keep: int) -> ScoreContext:
    return ScoreContext(stage=Stage(after_layer=2, keep=keep), tokens=tokens, num_layers=32,
                        observations={"instruction_attention_rows": lambda: rows})


# Two heads, three text rows onto six image tokens. Rows 0 and 1 attend to the image (mass 0.9 and 0.7, over the
# rows' mean of 0.57), row 2, a template token, hardly does (0.1) and only onto token 5.
ROWS = torch.tensor([
    [0.15, 0.20, 0.00, 0.30, 0.25, 0.00],
    [0.05, 0.20, 0.05, 0.30, 0.10, 0.00],
    [0.00, 0.00, 0.00, 0.00, 0.00, 0.10],
])[None].expand(2, -1, -1)
# Mean of the raters' rows: 0.10, 0.20, 0.025, 0.30, 0.175, 0: ranked 3, 1, 4, 0, 2, 5.
TOKENS = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)


def test_raters_are_the_text_rows_attending_to_the_image_above_the_mean():
    scores = pruning_zoo.get_strategy("sparsevlm").score(context(ROWS, TOKENS, 3))
    torch.testing.assert_close(scores, torch.tensor([0.10, 0.20, 0.025, 0.30, 0.175, 0.0]))
    # With every row rating, the template row's 0.1 on token 5 lifts it above token 2.
    everyone = pruning_zoo.get_strategy("sparsevlm", raters="all").score(context(ROWS, TOKENS, 3))
    assert everyone[5] > everyone[2]


def test_the_best_deleted_tokens_are_recycled_into_a_merged_token_after_the_kept_ones():
    strategy = pruning_zoo.get_strategy("sparsevlm")
    ctx = context(ROWS, TOKENS, 3)
    # 3 of 6: keep 2 by score (1, 3); of the 4 deleted, int(0.3*4)+1 = 2 best rated (4 and 0) are recycled into
    # int(0.1*2)+1 = 1 token, their mean. It takes its center's slot (token 0: equal densities, the earlier wins);
    # written into the ascending slots 0, 1, 3, the block reads [token 1, token 3, merged], the code's order.
    assert strategy.split(6, 3) == (2, 2, 1)
    (selection,) = strategy.select_images([ctx])
    assert selection.keep.tolist() == [0, 1, 3]
    torch.testing.assert_close(selection.features, torch.stack([TOKENS[1], TOKENS[3], (TOKENS[0] + TOKENS[4]) / 2]))
    # Without recycling: the plain top 3, in order.
    plain = pruning_zoo.get_strategy("sparsevlm", recycle=False).select_images([ctx])[0]
    assert plain.keep.tolist() == [1, 3, 4] and plain.features is None


def test_batched_selection_equals_one_image_at_a_time():
    strategy = pruning_zoo.get_strategy("sparsevlm")
    generator = torch.Generator().manual_seed(0)
    contexts = [context(torch.rand(2, 5, 40, generator=generator).softmax(-1), torch.randn(40, 8, generator=generator), 12)
                for _ in range(3)]
    batched = strategy.select_images(contexts)
    for ctx, selection in zip(contexts, batched):
        alone = strategy.select(strategy.score(ctx), 12, ctx)
        assert torch.equal(selection.keep, alone.keep)
        torch.testing.assert_close(selection.features, alone.features)


def test_dpc_knn_finds_one_center_per_cluster_and_merges_them_by_mean():
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [5.0, 0.0], [5.1, 0.0]]])
    centers, merged = cluster_and_merge(x, 2)
    assert sorted(c // 3 for c in centers[0].tolist()) == [0, 1]  # one in {0, 1, 2}, one in {3, 4}
    first = 0 if centers[0, 0] < 3 else 1
    torch.testing.assert_close(merged[0, first], torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(merged[0, 1 - first], torch.tensor([5.05, 0.0]))


#: The code's RETAIN_TOKN -> the tokens its schedule leaves after the last stage (kept + merged), of 576.
CODE_LAST = {64: 18, 96: 27, 128: 39, 192: 113}


@pytest.mark.parametrize("budget", sorted(CODE_SCHEDULES))
def test_the_codes_budgets_give_its_schedule_on_llava_1_5(budget):
    strategy = pruning_zoo.get_strategy("sparsevlm")
    stages = strategy.plan(CODE_LAST[budget], 576, 32)
    assert [stage.after_layer for stage in stages] == [2, 6, 15]
    entering = [576] + [stage.keep for stage in stages[:-1]]
    assert tuple(strategy.split(n, stage.keep)[0] for n, stage in zip(entering, stages)) == CODE_SCHEDULES[budget]
    # The code's 'Equal Tokens' (a prune layer counted with its pruned tokens) is the budget within one token.
    counts, bounds = [stage.keep for stage in stages], [2, 6, 15, 32]
    average = (2 * 576 + sum(c * (b - a) for c, a, b in zip(counts, bounds, bounds[1:]))) / 32
    assert abs(average - budget) < 1.0


def test_known_totals_after_recycling_and_the_budget_after_pruning():
    strategy = pruning_zoo.get_strategy("sparsevlm")
    assert strategy.budget_meaning == pruning_zoo.BudgetMeaning.AFTER_PRUNING
    assert [stage.keep for stage in strategy.plan(113, 576, 32)] == [309, 204, 113]  # the code's 192
    assert [stage.keep for stage in strategy.plan(18, 576, 32)] == [82, 32, 18]  # the code's 64
    assert strategy.plan(64, 576, 32)[-1].keep == 64 and strategy.plan(1, 576, 32)[-1].keep == 1
    assert strategy.plan(576, 576, 32) == ()


@pytest.mark.parametrize("budget", [64, 128, 192, 300])
def test_a_per_layer_average_is_the_engines_closest_average(budget):
    from pruning_zoo.strategies.sparsevlm import layer_average

    strategy = pruning_zoo.get_strategy("sparsevlm", budget_counts="per_layer_average")
    stages = strategy.plan(budget, 576, 32)
    reached = layer_average(stages, 576, 32)
    # No other last count comes closer: one token more or less at the end moves the average by under one token.
    assert abs(reached - budget) < 1.0
    assert reached == pytest.approx(layer_average(strategy.schedule(stages[-1].keep, 576, [2, 6, 15]), 576, 32))


def test_prune_layers_scale_with_depth_and_must_fit():
    strategy = pruning_zoo.get_strategy("sparsevlm")
    assert strategy.prune_layers(32) == [2, 6, 15]
    assert strategy.prune_layers(4) == [0, 1, 2]
    assert strategy.prune_layers(28) == [2, 5, 13]
    with pytest.raises(pruning_zoo.InvalidParameterError, match="last must be below 2"):
        strategy.plan(8, 16, 3)
    average = pruning_zoo.get_strategy("sparsevlm", budget_counts="per_layer_average")
    with pytest.raises(pruning_zoo.InvalidParameterError, match="lowest reachable average is 55.7"):
        average.plan(32, 576, 32)


@pytest.mark.parametrize("values", [{"recycle_ratio": 1.5}, {"cluster_ratio": -0.1}, {"raters": "every"},
                                    {"prune_layers": [2, 6]}, {"reference_depth": 0}])
def test_invalid_parameters_are_refused(values):
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("sparsevlm", **values)


def test_sparsevlm_cached_generation_equals_recomputing_the_pruned_sequence(family_model):
    family, model = family_model
    inputs = family.inputs(3)
    recording = Recording(pruning_zoo.get_strategy("sparsevlm"))
    with torch.no_grad():
        with prune(model, recording, 0.5):
            generated = model.generate(**inputs, generation_config=greedy(model), output_logits=True,
                                       return_dict_in_generate=True)
        tokens, logits = recompute_without_cache(model, family, inputs, Replay(recording), 0.5, STEPS)
    assert any(selection.features is not None for selection in recording.selections)  # tokens were recycled
    cached_tokens, cached_logits = generated.sequences[:, -STEPS:], torch.stack(generated.logits, 1)
    for row in range(cached_tokens.shape[0]):
        steps = _steps_until_eos(cached_tokens[row], model.generation_config.eos_token_id)
        assert torch.equal(cached_tokens[row, :steps], tokens[row, :steps])
        torch.testing.assert_close(cached_logits[row, :steps], logits[row, :steps], rtol=1e-4, atol=1e-4)
