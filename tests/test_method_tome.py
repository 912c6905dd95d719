"""ToMe's rules on hand-made cases whose answers follow from the spec (docs/methods/tome.md): bipartite soft
matching, the r schedule, rounds beyond half, the plan, and its parameters."""

from __future__ import annotations

import pytest
import torch

import pruning_zoo
from pruning_zoo.strategy import ScoreContext, Stage

tome = pytest.importorskip("pruning_zoo.strategies.tome")

#: Six tokens: A = positions 0, 2, 4 (even), B = 1, 3, 5 (odd). A0 ~ B1 (cos 0.9988), A2 ~ B3 (cos 0.981), A4 is far
#: from every B token (its best, B5, at cos 0.67).
TOKENS = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.2, 1.0], [-1.0, 0.05], [-1.0, -1.0]])


def test_bipartite_matching_merges_the_most_similar_edges_into_their_b_token():
    keep, into = tome.bipartite_merge(TOKENS[None], 1)
    assert keep.tolist() == [[1, 2, 3, 4, 5]]  # A0 merged into B1
    assert into.tolist() == [[0, 0, 1, 2, 3, 4]]  # A0 -> B1's place in keep (0); every kept token its own
    keep, into = tome.bipartite_merge(TOKENS[None], 2)
    assert keep.tolist() == [[1, 3, 4, 5]]  # then A2 into B3; A4 stays
    assert into.tolist() == [[0, 0, 1, 1, 2, 3]]
    keep, into = tome.bipartite_merge(TOKENS[None], 3)  # every A token: A4 into its best B, B5
    assert keep.tolist() == [[1, 3, 5]] and into.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_the_score_keeps_b_tokens_and_the_least_matched_a_tokens():
    strategy = pruning_zoo.get_strategy("tome", metric="hidden")
    ctx = ScoreContext(stage=Stage(None, 4, vision_block=0), tokens=TOKENS, num_layers=4,
                       observations={"unit_sizes": lambda: torch.ones(6)})
    scores = strategy.score(ctx)
    assert torch.isinf(scores[1::2]).all()
    assert scores[0] < scores[2] < scores[4]  # A0 matches best: merged first
    (selection,) = strategy.select_images([ctx])
    assert selection.keep.tolist() == [1, 3, 4, 5] and selection.into.tolist() == [0, 0, 1, 1, 2, 3]


def test_more_than_half_merges_in_rounds_on_the_size_weighted_metric():
    # Round 1 (r=3 of 6): [1, 3, 5] remain, holding {0,1}, {2,3}, {4,5}; round 2 (r=1 of 3): A = {B1, B5}, B = {B3};
    # the pair means (0.5, 0.025) and (-1, -0.475): (0.5, 0.025) is closer to (0.1, 1) than the other, so B1 merges.
    keep, into = tome.merge_rounds(TOKENS[None], torch.ones(1, 6), 2)
    assert keep.tolist() == [[3, 5]] and into.tolist() == [[0, 0, 0, 0, 1, 1]]
    keep, into = tome.merge_rounds(TOKENS[None], torch.ones(1, 6), 1)
    assert keep.shape == (1, 1) and into.tolist() == [[0] * 6]


def test_the_schedule_merges_the_budget_exactly():
    constant = tome.schedule(512, 22, 0.0)
    assert sum(constant) == 512 and set(constant) <= {23, 24}
    decreasing = tome.schedule(512, 22, -1.0)  # the paper's decreasing schedule: 2r down to 0
    assert sum(decreasing) == 512 and decreasing == sorted(decreasing, reverse=True) and decreasing[-1] <= 2
    assert tome.schedule(7, 1, 0.0) == [7]


def test_the_plan_merges_after_every_block_up_to_the_feature_layer():
    strategy = pruning_zoo.get_strategy("tome")
    stages = strategy.plan(64, 576, 32, vision_blocks=23)  # LLaVA-1.5: CLIP blocks 0..22 read, merges after 0..21
    assert [s.vision_block for s in stages] == list(range(22))
    assert stages[-1].keep == 64 and all(s.after_layer is None for s in stages)
    assert [s.keep for s in stages] == sorted((s.keep for s in stages), reverse=True)
    assert strategy.plan(576, 576, 32, vision_blocks=23) == ()  # keep-all: the unpruned model
    late = pruning_zoo.get_strategy("tome", first_block=20).plan(64, 576, 32, vision_blocks=23)
    assert [s.vision_block for s in late] == [20, 21] and late[-1].keep == 64
    then = pruning_zoo.get_strategy("tome", fastv_k=2, fastv_keep=0.5).plan(128, 576, 32, vision_blocks=32)
    assert then[-1] == Stage(after_layer=1, keep=64) and then[-2] == Stage(None, 128, vision_block=30)


def test_parameters_are_validated():
    for bad in ({"inflection": 2.0}, {"metric": "queries"}, {"fastv_k": 0}, {"fastv_keep": 0.0}, {"first_block": -1}):
        with pytest.raises(pruning_zoo.InvalidParameterError):
            pruning_zoo.get_strategy("tome", **bad)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="no vision block"):
        pruning_zoo.get_strategy("tome", first_block=22).plan(64, 576, 32, vision_blocks=23)
    with pytest.raises(pruning_zoo.InvalidParameterError, match="below the model's 32"):
        pruning_zoo.get_strategy("tome", fastv_k=32).plan(64, 576, 32, vision_blocks=23)
