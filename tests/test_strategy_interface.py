import dataclasses

import pydantic
import pytest
import torch

import pruning_zoo
import pruning_zoo.strategy as strategy_module
from pruning_zoo.strategy import (
    Stage,
    StrategyParams,
    ascending,
    build_params,
    describe_field,
    fp32_products,
    params_dataclass,
    top_k_in_order,
    top_k_mask,
    true_indices,
)
from pruning_zoo.strategy.budget import parse_budget, resolve_budget


@params_dataclass(frozen=True)
class ExampleParams(StrategyParams):
    layer: int = pydantic.Field(default=2, ge=0, le=31)
    alpha: float = pydantic.Field(default=0.5, gt=0.0, lt=1.0)


def test_top_k_keeps_original_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert top_k_in_order(scores, 3).tolist() == [1, 2, 3]


@pytest.mark.parametrize("seed", range(4))
def test_top_k_mask_marks_what_topk_picks_and_the_first_of_equal_scores(seed, monkeypatch):
    """Eagerly by a stable sort, compiled by pairwise ranks (up to PAIRWISE_LIMIT scores, by the sort
    beyond): the rows torch.topk picks where scores are distinct; of equal scores the first wins, either way."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 50, generator=generator)
    tied = torch.randint(0, 4, (3, 50), generator=generator).float()
    compiled = torch.compile(top_k_mask, backend="aot_eager", dynamic=False)
    for k in (0, 1, 17, 50):
        expected = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, torch.topk(scores, k).indices, True)
        assert torch.equal(top_k_mask(scores, k), expected)
        assert torch.equal(compiled(scores, k), expected)
        assert torch.equal(top_k_mask(scores[1], k), expected[1])
        assert torch.equal(top_k_in_order(scores, k), torch.topk(scores, k).indices.sort(dim=1).values)
    for k in (1, 20, 49):
        mask = top_k_mask(tied, k)
        assert torch.equal(compiled(tied, k), mask)
        assert mask.sum(-1).tolist() == [k] * 3
        for row, kept in zip(tied, mask):
            threshold = row.sort(descending=True).values[k - 1]
            assert bool((row[kept] >= threshold).all()) and bool((row[~kept] <= threshold).all())
            taken = kept[(row == threshold).nonzero()[:, 0]]
            assert bool(taken[: int(taken.sum())].all())  # the first of the equal scores are the ones kept
    monkeypatch.setattr(strategy_module, "PAIRWISE_LIMIT", 10)
    torch._dynamo.reset()
    compiled = torch.compile(top_k_mask, backend="aot_eager", dynamic=False)
    assert torch.equal(compiled(tied, 20), top_k_mask(tied, 20))


def test_top_k_mask_ranks_nan_above_every_number_compiled_as_eagerly():
    """A NaN score ranks first, as in the sort; the compiled mask then still holds exactly k."""
    scores = torch.tensor([[0.5, float("nan"), 0.9, 0.1, float("nan"), 0.7], [0.3, 0.2, 0.1, 0.0, -1.0, float("nan")]])
    compiled = torch.compile(top_k_mask, backend="aot_eager", dynamic=False)
    for k in (1, 2, 3, 5):
        mask = top_k_mask(scores, k)
        assert mask.sum(-1).tolist() == [k, k]
        assert torch.equal(compiled(scores, k), mask)
    assert top_k_mask(scores, 3).tolist() == [[False, True, True, False, True, False], [True, True, False, False, False, True]]


def test_fp32_products_sum_exact_products_in_fp32():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 5, 64, generator=generator).bfloat16(), torch.randn(2, 3, 64, 7, generator=generator).bfloat16()
    product = fp32_products(a, b)
    assert product.dtype == torch.float32 and product.shape == (2, 3, 5, 7)
    torch.testing.assert_close(product, a.double() @ b.double(), rtol=1e-6, atol=1e-5, check_dtype=False)


def test_params_coerce_strings_from_the_command_line():
    params = build_params("example", ExampleParams, {"layer": "5", "alpha": "0.25", "positions": "keep"})
    assert (params.layer, params.alpha, params.positions) == (5, 0.25, "keep")


def test_params_are_frozen():
    params = build_params("example", ExampleParams, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.layer = 3


@pytest.mark.parametrize(
    "values, message",
    [
        ({"layer": 40}, r"invalid value 40 for parameter example.layer: .*less than or equal to 31; allowed: integer >= 0 <= 31 \(default 2\)"),
        ({"alpha": "high"}, r"invalid value 'high' for parameter example.alpha: .*allowed: number > 0.0 < 1.0"),
        ({"positions": "shift"}, r"example.positions.*allowed: one of 'keep', 'renumber'"),
        ({"layr": 1}, r"strategy 'example' has no parameter 'layr'; did you mean 'layer'\? its parameters: positions, layer, alpha"),
        ({"zzz": 1}, r"has no parameter 'zzz'; its parameters"),
    ],
)
def test_invalid_params_name_the_parameter_value_and_what_is_allowed(values, message):
    with pytest.raises(pruning_zoo.InvalidParameterError, match=message):
        build_params("example", ExampleParams, values)


def test_describe_field():
    assert describe_field(ExampleParams, "layer") == "integer >= 0 <= 31 (default 2)"


def test_budget_parsing_and_resolution():
    assert parse_budget("64") == 64 and parse_budget("0.25") == 0.25
    assert resolve_budget(64, 576) == 64
    assert resolve_budget(0.25, 576) == 144
    assert resolve_budget(1e-6, 576) == 1
    assert resolve_budget(576, 576) == 576


@pytest.mark.parametrize(
    "budget, message",
    [
        (0, "at least 1 visual token"),
        (-3, "at least 1 visual token"),
        (1.5, "outside \\(0, 1\\]"),
        (0.0, "outside \\(0, 1\\]"),
        (577, "larger than the 576 visual tokens"),
        (True, "must be an int token count"),
    ],
)
def test_bad_budgets_are_clear_errors(budget, message):
    with pytest.raises(pruning_zoo.InvalidParameterError, match=message):
        resolve_budget(budget, 576)


def test_unparsable_budget():
    with pytest.raises(pruning_zoo.InvalidParameterError, match="'lots' is not a number"):
        parse_budget("lots")


def test_stage_describes_itself():
    assert str(Stage(after_layer=None, keep=64)) == "before the LLM: keep 64"
    assert str(Stage(after_layer=1, keep=30)) == "after layer 1: keep 30"
    assert Stage(after_layer=1, keep=30).in_llm and not Stage(after_layer=None, keep=3).in_llm


def test_a_missing_observation_is_a_clear_error():
    ctx = pruning_zoo.ScoreContext(stage=Stage(None, 2), tokens=torch.zeros(4, 2), num_layers=2)
    with pytest.raises(pruning_zoo.PruningZooError, match="observation 'keys' is not available before the LLM"):
        ctx.observe("keys")


def test_params_of_the_wrong_class_are_refused():
    with pytest.raises(pruning_zoo.InvalidParameterError, match="fastv' takes FastVParams, not RandomParams"):
        pruning_zoo.get_strategy("fastv").__class__(pruning_zoo.get_strategy("random").params)


@pytest.mark.parametrize("seed", range(5))
def test_true_indices_and_ascending_order_as_a_stable_sort_does(seed):
    """Counted, not sorted (a sort was the slowest kernel of some selections on a GPU): the same indices as a
    stable sort of the mask, including where fewer entries are True than asked for."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 40, generator=generator) < 0.3
    compiled = torch.compile(true_indices, backend="aot_eager", dynamic=False)  # counted pairwise
    for count in (0, 5, int(mask.sum(-1).min()), 40):
        expected = torch.sort((~mask).to(torch.uint8), stable=True).indices[..., :count]
        assert torch.equal(true_indices(mask, count), expected)
        assert torch.equal(true_indices(mask[0], count), expected[0])
        assert torch.equal(compiled(mask, count), expected)
        assert torch.equal(compiled(mask[0], count), expected[0])
    picked = torch.randperm(40, generator=generator)[:17]
    assert torch.equal(ascending(picked, 40), picked.sort().values)
    batch = torch.stack([torch.randperm(40, generator=generator)[:9] for _ in range(4)])
    assert torch.equal(ascending(batch, 40), batch.sort(dim=-1).values)
