"""DivPrune (Alvar et al., CVPR 2025; code vbdi/divprune): keep the most diverse visual tokens before the LLM,
chosen greedily by max-min cosine distance between the projected visual tokens (docs/methods/divprune.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pruning_zoo.plugins.hookspecs import hookimpl
from pruning_zoo.strategy import (
    BudgetMeaning,
    PruningStrategy,
    ScoreContext,
    Selection,
    Stage,
    StrategyParams,
    ascending,
    one_size,
    params_dataclass,
)


@params_dataclass(frozen=True)
class DivPruneParams(StrategyParams):
    """Only positions: the code has no other knob than its keep ratio, which the budget replaces. Kept tokens are
    renumbered contiguously (the default), as the code's LLaVA builds a new, shorter sequence."""


def max_min_order(tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] indices into [B, n, d] tokens, picked greedily: first the token farthest (in cosine distance)
    from its nearest other token, then each time the token farthest from everything picked so far."""
    unit = F.normalize(tokens.float(), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, n, n]
    batch, n = distance.shape[:2]
    rows = torch.arange(batch, device=tokens.device)
    self_pairs = torch.eye(n, dtype=torch.bool, device=tokens.device)
    nearest_other = distance.masked_fill(self_pairs, float("inf")).amin(dim=1)
    pick = nearest_other.argmax(dim=1)
    picks = [pick]
    to_picked = distance[rows, pick].clone()  # each token's distance to the nearest picked token
    for _ in range(steps - 1):
        to_picked[rows, pick] = -float("inf")  # never picked twice, even among duplicates
        pick = to_picked.argmax(dim=1)
        picks.append(pick)
        to_picked = torch.minimum(to_picked, distance[rows, pick])
    return torch.stack(picks, dim=1)


class DivPrune(PruningStrategy):
    """DivPrune, one selection before the LLM (the code's LAYER_INDEX=0, its main results).

    The features are the visual tokens as they enter the LLM (the projector's output); the distance is one minus
    their cosine similarity. The budget is the number of tokens kept, replacing the code's SUBSET_RATIO (0.098 of
    576 is 56 tokens). The first pick is the token whose nearest other token is farthest, each later pick the
    token whose nearest picked token is farthest. Two departures that change nothing on real features: the
    first step leaves each token's own distance out exactly (the code takes the second-smallest distance of its
    column, which is the nearest other token unless rounding puts a self-distance above it), and a token is never
    picked twice (the code could repeat one when all the rest duplicate picked ones).
    """

    name = "divprune"
    Params = DivPruneParams
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return () if budget == num_visual else (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """The greedy order as a score: the first pick scores n, the last 1, so the top `keep` are its picks."""
        n = ctx.tokens.shape[0]
        order = max_min_order(ctx.tokens[None], n)[0]
        scores = torch.empty(n, device=ctx.tokens.device)
        scores[order] = torch.arange(n, 0, -1, dtype=scores.dtype, device=scores.device)
        return scores

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        keep, n = contexts[0].stage.keep, contexts[0].tokens.shape[0]
        picks = max_min_order(torch.stack([ctx.tokens for ctx in contexts]), keep)
        return [Selection(keep=ascending(row, n)) for row in picks]


@hookimpl
def register_strategies(register):
    register(DivPrune)
