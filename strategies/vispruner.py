"""VisPruner (Zhang et al., ICCV 2025; code Theia-4869/VisPruner): before the LLM, keep the important tokens the
vision encoder's CLS attends to most, then diverse tokens left after removing near-duplicates among the rest
(docs/methods/vispruner.md)."""

from __future__ import annotations

from collections.abc import Sequence

import pydantic
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
class VisPrunerParams(StrategyParams):
    important_ratio: float = pydantic.Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="share of the budget given to important tokens, int(budget * ratio) (the code's "
        "--important_ratio, default 0.5; its README runs MME at 64 tokens with 0.75); the rest are diverse tokens",
    )
    layer: int = pydantic.Field(
        default=-2,
        description="vision block whose CLS attention ranks the tokens: -2, the penultimate, the block whose output "
        "LLaVA projects (the code reads attentions[mm_vision_select_layer])",
    )
    drop_per_round: int = pydantic.Field(
        default=8,
        ge=1,
        description="near-duplicates removed per matching round (the code's hard-coded 8)",
    )


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, count: int, per_round: int) -> torch.Tensor:
    """VisPruner's duplicate removal: [B, count] indices left of `residual` [B, R] (indices into features [B, n, D]).

    Each round splits the residual tokens, in their current order, into A (even places) and B (odd places), scores
    every A token by its largest cosine similarity to a B token and drops the min(per_round, R - count, |A|) most
    similar; the residual becomes [the A tokens left, by descending similarity; B]. The rounds depend only on the
    counts, so the loop is the same for every image and never reads the device."""
    unit = F.normalize(features.float(), dim=-1)
    while residual.shape[1] > count and count > 0:
        first, second = residual[:, ::2], residual[:, 1::2]
        drop = min(per_round, residual.shape[1] - count, first.shape[1])
        similarity = gather_rows(unit, first) @ gather_rows(unit, second).transpose(1, 2)
        order = torch.sort(similarity.amax(dim=2), dim=1, descending=True, stable=True).indices
        residual = torch.cat([first.gather(1, order[:, drop:]), second], dim=1)
    return residual[:, :count]


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, n, D] at rows index [B, k]: [B, k, D]."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


class VisPruner(PruningStrategy):
    """VisPruner, one selection before the LLM; the budget counts the tokens entering it.

    1. Important: int(budget * important_ratio) tokens of highest CLS attention at `layer` (mean over heads; without
       CLS, Qwen's mean received attention, the engine's observation).
    2. Diverse: the rest of the budget, from the other tokens in descending-attention order, by the code's rounds of
       even/odd matching on the cosine similarity of the projector's input features (`remove_duplicates`).
    3. The kept tokens enter the LLM in their original order, renumbered (the code builds a new sequence).
    LLaVA-NeXT: the code prunes every crop to the budget on its own; here the image's packed tokens are one pool.
    """

    name = "vispruner"
    Params = VisPrunerParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    vision_layer_params = ("layer",)
    observes = frozenset({"vision_attention", "vision_features"})

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return () if budget == num_visual else (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """The CLS attention, mean over heads: the important tokens' ranking."""
        return ctx.observe("vision_attention", layer=self.params.layer).float().mean(dim=0)

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        return self.choose([ctx], scores[None], keep)[0]

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        scores = torch.stack([self.score(ctx) for ctx in contexts])
        return self.choose(contexts, scores, contexts[0].stage.keep)

    def choose(self, contexts: Sequence[ScoreContext], scores: torch.Tensor, keep: int) -> list[Selection]:
        """Steps 1-2 for images of one size, scores [B, n]."""
        important = int(keep * self.params.important_ratio)
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices
        features = torch.stack([ctx.observe("vision_features") for ctx in contexts]).flatten(2)  # [B, n, D]
        diverse = remove_duplicates(features, ranked[:, important:], keep - important, self.params.drop_per_round)
        kept = ascending(torch.cat([ranked[:, :important], diverse], dim=1), scores.shape[1])
        return [Selection(keep=row) for row in kept]


@hookimpl
def register_strategies(register):
    register(VisPruner)
