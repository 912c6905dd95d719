"""DART (Wen et al., EMNLP 2025; arXiv 2502.11494; code ZichenWen1/DART): keep the image tokens that duplicate a
few pivot tokens least, after layer K-1 of the LLM (docs/methods/dart.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from pruning_zoo.errors import InvalidParameterError
from pruning_zoo.plugins.hookspecs import hookimpl
from pruning_zoo.strategy import (
    BudgetMeaning,
    PruningStrategy,
    ScoreContext,
    Selection,
    Stage,
    StrategyParams,
    params_dataclass,
    true_indices,
)


@params_dataclass(frozen=True)
class DARTParams(StrategyParams):
    k: int = pydantic.Field(
        default=2, ge=1,
        description="full layers K: pivots and similarities come from layer K-1, the pruned sequence enters layer K "
        "(the code's pruned_layer=2)",
    )
    pivot_image_tokens: int = pydantic.Field(
        default=4, ge=1, description="image pivots: the image tokens of largest key L1 norm, always kept (the code: 4)"
    )
    pivot_text_tokens: int = pydantic.Field(
        default=4, ge=0,
        description="text pivots: the tokens after the image of largest key L1 norm, never kept as image tokens "
        "(the code: 4)",
    )
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="keep", description="kept tokens keep their original position ids, with gaps (the code)"
    )


class DART(PruningStrategy):
    """DART, one drop at prefill after layer K-1 (0-indexed); decoding does not re-prune.

    Pivots: the `pivot_image_tokens` image tokens and the `pivot_text_tokens` tokens after the image (to the
    prompt's end) whose layer K-1 keys (rotary applied, heads concatenated) have the largest L1 norm. Each pivot
    in turn takes its share of the not-yet-taken, non-pivot image tokens LEAST cosine-similar to it, similarity
    measured between layer K-1's output hidden states after the model's final norm. Kept: the image pivots and
    every token taken, in original order.

    Budget: the exact count kept from layer K on. The code keeps the image pivots plus floor(B/8) tokens per
    pivot, B+4 tokens for its max_num_trunction=B (132 at 128); here the budget minus the image pivots is spread
    over the pivots as evenly as it goes (the first ones take one more), so a budget of 8t+4 is the code's
    selection for B=8t. The code visits the pivots in Python set order (by position modulo the set's table size);
    here the image pivots come first, then the text pivots, each by descending key norm. A prompt with fewer
    tokens after the image than `pivot_text_tokens` uses them all.
    """

    name = "dart"
    Params = DARTParams
    budget_meaning = BudgetMeaning.AFTER_PRUNING
    observes = frozenset({"stage_keys", "stage_output_final_norm"})

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        if self.params.k >= num_layers:
            raise InvalidParameterError(f"dart.k={self.params.k} must be below the model's {num_layers} decoder layers")
        return () if budget == num_visual else (Stage(after_layer=self.params.k - 1, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """1 at the kept tokens, 0 elsewhere: the selection is no ranking, so `select_images` makes it."""
        return self.kept_masks([ctx]).float()[0]

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        groups: dict[tuple, list[int]] = {}  # images alike in tokens, keep and text pivots are selected together
        for i, ctx in enumerate(contexts):
            groups.setdefault((ctx.tokens.shape[0], ctx.stage.keep, self.text_pivots(ctx)), []).append(i)
        selections: list[Selection | None] = [None] * len(contexts)
        for members in groups.values():
            keep = contexts[members[0]].stage.keep
            kept = true_indices(self.kept_masks([contexts[i] for i in members]), keep)
            for i, row in zip(members, kept):
                selections[i] = Selection(keep=row)
        return selections

    def text_pivots(self, ctx: ScoreContext) -> int:
        return min(self.params.pivot_text_tokens, ctx.observe("stage_keys", rows="after_image").shape[0])

    def kept_masks(self, contexts: Sequence[ScoreContext]) -> torch.Tensor:
        """[B, n] True at the kept tokens of images alike in token count, keep and number of text pivots."""
        keep, text_count = contexts[0].stage.keep, self.text_pivots(contexts[0])
        image_count = min(self.params.pivot_image_tokens, keep)

        def stacked(name: str, rows: str) -> torch.Tensor:
            return torch.stack([ctx.observe(name, rows=rows) for ctx in contexts]).float()

        image_keys = stacked("stage_keys", "image").flatten(2)  # [B, n, kv_heads * head_dim]
        image_pivots = image_keys.abs().sum(dim=-1).topk(image_count, dim=-1).indices  # [B, p]
        image_states = F.normalize(stacked("stage_output_final_norm", "image"), dim=-1)  # [B, n, d]
        pivots = [image_states.gather(1, image_pivots[..., None].expand(-1, -1, image_states.shape[-1]))]
        if text_count:  # prompts may differ in length after the image: each image's own pivots, then stacked
            pivots.append(torch.stack([self.text_pivot_states(ctx, text_count) for ctx in contexts]))
        similarity = torch.cat(pivots, dim=1) @ image_states.transpose(1, 2)  # [B, pivots, n] cosine

        taken = torch.zeros(image_states.shape[:2], dtype=torch.bool, device=image_states.device)
        taken.scatter_(1, image_pivots, True)
        share, extra = divmod(keep - image_count, similarity.shape[1])
        for pivot in range(similarity.shape[1]):
            count = share + (pivot < extra)
            if count:  # the least similar of the tokens not yet taken
                least = similarity[:, pivot].masked_fill(taken, float("inf")).topk(count, dim=-1, largest=False).indices
                taken.scatter_(1, least, True)
        return taken

    @staticmethod
    def text_pivot_states(ctx: ScoreContext, count: int) -> torch.Tensor:
        """[count, d] unit final-normed states of the `count` tokens after the image of largest key L1 norm."""
        norms = ctx.observe("stage_keys", rows="after_image").float().flatten(1).abs().sum(dim=-1)
        states = ctx.observe("stage_output_final_norm", rows="after_image").float()
        return F.normalize(states[norms.topk(count).indices], dim=-1)


@hookimpl
def register_strategies(register):
    register(DART)
