"""CDPruner: the conditional DPP's greedy MAP picks on hand-made tokens, the relevance variants, the parameters, and
the engine's `instruction_embeddings` observation (docs/methods/cdpruner.md)."""

from __future__ import annotations

import itertools

import pytest
import torch
from pruning_zoo.strategies.cdpruner import CDPruner, dpp_greedy

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage


def unit(*values: float) -> list[float]:
    vector = torch.tensor(values, dtype=torch.float32)
    return (vector / vector.norm()).tolist()


# A and B, C orthogonal; A2 nearly A. The instruction lies between A and B, away from C.
TOKENS = torch.tensor([unit(1, 0, 0), unit(1, 0.1, 0), unit(0, 1, 0), unit(0, 0, 1)])
INSTRUCTION = torch.tensor([unit(1, 1, 0)])


def context(keep: int, instruction: torch.Tensor = INSTRUCTION, tokens: torch.Tensor = TOKENS) -> ScoreContext:
    return ScoreContext(stage=Stage(after_layer=None, keep=keep), tokens=tokens, num_layers=2,
                        observations={"instruction_embeddings": lambda: instruction})


def picks(strategy, ctx) -> list[int]:
    return strategy.select_images([ctx])[0].keep.tolist()


def test_greedy_map_adds_the_item_of_largest_determinant_each_step():
    features = torch.randn(2, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    kernel = weights[:, :, None] * (features @ features.transpose(1, 2)) * weights[:, None, :]
    got = dpp_greedy(kernel, 5)
    for image in range(2):
        chosen = []
        for _ in range(5):
            rest = [j for j in range(7) if j not in chosen]
            dets = [torch.det(kernel[image][chosen + [j]][:, chosen + [j]]) for j in rest]
            chosen.append(rest[int(torch.stack(dets).argmax())])
        assert got[image].tolist() == chosen


def test_greedy_map_never_repeats_past_the_kernels_rank():
    features = torch.randn(1, 6, 2, generator=torch.Generator().manual_seed(2))  # rank 2, 6 picks
    order = dpp_greedy(features @ features.transpose(1, 2), 6)[0]
    assert sorted(order.tolist()) == list(range(6))


def test_similar_relevance_keeps_the_relevant_and_diverse_tokens():
    # Cosines with the instruction: A 0.707, A2 0.774, B 0.707, C 0. Normalised, C's relevance is ~0, A2's 1, A's
    # and B's 0.913. The DPP takes A2 first (largest r^2), then B (orthogonal to A2), not A (a near duplicate).
    strategy = pruning_zoo.get_strategy("cdpruner", relevance="similar")
    assert picks(strategy, context(2)) == [1, 2]
    assert torch.topk(strategy.score(context(2)), 2).indices.sort().values.tolist() == [1, 2]


def test_negated_relevance_as_the_code_prefers_the_least_similar():
    # Negated: C's relevance is the largest (1), A2's ~0, A's and B's equal (0.087): C first, then A (first of the tie).
    strategy = pruning_zoo.get_strategy("cdpruner")
    assert strategy.params.relevance == "negated"
    assert picks(strategy, context(2)) == [0, 3]


def test_without_relevance_it_is_a_plain_dpp_over_similarity():
    # theta = 0 weighs every token exp(0) = 1, as does an empty instruction: A first (first of equal gains), then
    # B and C, never A2.
    assert picks(pruning_zoo.get_strategy("cdpruner", theta=0.0), context(3)) == [0, 2, 3]
    assert picks(pruning_zoo.get_strategy("cdpruner"), context(3, instruction=torch.zeros(0, 3))) == [0, 2, 3]


def test_a_batch_selects_each_image_as_alone():
    strategy = pruning_zoo.get_strategy("cdpruner")
    flipped = context(2, tokens=TOKENS.flip(0))
    together = strategy.select_images([context(2), flipped])
    assert [s.keep.tolist() for s in together] == [picks(strategy, context(2)), picks(strategy, flipped)]


@pytest.mark.parametrize("values", [{"theta": 1.0}, {"theta": -0.1}, {"relevance": "cosine"}])
def test_cdpruner_refuses_parameters_out_of_bounds(values):
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("cdpruner", **values)


class Watching(CDPruner):
    """CDPruner that keeps what the engine hands it as the instruction."""

    seen: list

    def select_images(self, contexts):
        self.seen = [ctx.observe("instruction_embeddings") for ctx in contexts]
        return super().select_images(contexts)


def test_instruction_embeddings_are_the_prompt_after_the_image(family_model):
    family, model = family_model
    inputs = family.inputs(3)
    strategy = Watching()
    with torch.no_grad(), prune(model, strategy, 0.5):
        model(**inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_token = next(t for t in (model.config.image_token_id, getattr(model.config, "image_token_index", None))
                       if t is not None and bool((ids == t).any()))
    embeddings = model.get_input_embeddings()(ids)
    for sample, seen in zip(range(ids.shape[0]), strategy.seen):
        last = int((ids[sample] == image_token).nonzero().max())
        after = (torch.arange(ids.shape[1]) > last) & (ids[sample] != image_token) & mask[sample].bool()
        assert seen.shape[0] == int(after.sum()) > 0
        torch.testing.assert_close(seen, embeddings[sample, after])


def test_every_pair_of_the_hand_made_case_is_counted_once():
    # The greedy's first two picks maximise det over pairs that contain the first pick: check against all pairs.
    strategy = pruning_zoo.get_strategy("cdpruner", relevance="similar")
    ctx = context(2)
    unit_tokens = torch.nn.functional.normalize(TOKENS, dim=-1)
    r = strategy.relevance(ctx, unit_tokens)
    kernel = r[:, None] * (unit_tokens @ unit_tokens.T) * r[None, :]
    first = int(kernel.diagonal().argmax())
    best = max((pair for pair in itertools.combinations(range(4), 2) if first in pair),
               key=lambda pair: float(torch.det(kernel[list(pair)][:, list(pair)])))
    assert picks(strategy, ctx) == list(best)
