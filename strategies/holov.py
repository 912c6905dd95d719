"""HoloV (Zou et al., NeurIPS 2025; code obananas/HoloV): before the LLM, split the visual tokens into crops, give
each crop a share of the budget by its score (attention plus a similarity-variance term) and keep each crop's
most attended tokens (docs/methods/holov.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

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
    one_size,
    params_dataclass,
    true_indices,
)

EPS = 1e-6  # the code's `esp`


@params_dataclass(frozen=True)
class HoloVParams(StrategyParams):
    crops: int | None = pydantic.Field(
        default=None,
        ge=1,
        description="number of crops; None: max(1, int(1024/576 * n / budget)), the Qwen code's rule (16 at 64 "
        "of 576 tokens, the LLaVA code's fixed 16; 8 at 128, 5 at 192)",
    )
    partition: Literal["sequence", "grid"] = pydantic.Field(
        default="sequence",
        description="'sequence': runs of consecutive tokens, n // crops each, the first n % crops one longer (the "
        "code); 'grid': near-square blocks of the patch grid (the paper's spatial crops), where the tokens form "
        "one grid, else 'sequence'",
    )
    alpha: float = pydantic.Field(default=0.09, ge=0.0, description="weight of the similarity-variance term")
    layer: int = pydantic.Field(
        default=-2,
        description="vision block whose attention is read: -2, the CLS row at LLaVA's feature layer (the LLaVA "
        "code); the Qwen code reads the last block's received attention (-1)",
    )


def crop_index(n: int, crops: int, grid: tuple[int, int] | None, partition: str, device) -> tuple[torch.Tensor, int]:
    """([n] the crop of each token, the number of crops): every crop non-empty, so there may be fewer than asked."""
    index = torch.arange(n, device=device)
    if partition == "grid" and grid is not None:
        rows, cols = grid
        down = max(d for d in range(1, int(min(crops, n) ** 0.5) + 1) if crops % d == 0)  # the factor nearest the root
        down, across = min(down, rows), min(crops // down, cols)
        return (index // cols * down // rows) * across + index % cols * across // cols, down * across
    crops = min(crops, n)
    size, longer = divmod(n, crops)
    boundary = longer * (size + 1)
    return torch.where(index < boundary, index // (size + 1), longer + (index - boundary) // size), crops


def holov_keep(tokens: torch.Tensor, attention: torch.Tensor, crop: torch.Tensor, crops: int, keep: int,
               alpha: float) -> torch.Tensor:
    """[B, n] bool, exactly `keep` True per image: HoloV's picks among [B, n, d] tokens with attention [B, n], in
    `crops` crops, `crop` [n] giving each token's."""
    member = (crop[None, :] == torch.arange(crops, device=crop.device)[:, None]).float()  # [C, n]
    size = member.sum(dim=1)
    same = crop[:, None] == crop[None, :]
    others = (size[crop] - 1).clamp(min=1)

    def crop_mean(values):  # [B, n] -> [B, C]
        return values @ member.T / size

    unit = F.normalize(tokens.float(), dim=-1, eps=EPS)
    similarity = unit @ unit.transpose(1, 2) * (same & ~torch.eye(crop.shape[0], dtype=torch.bool, device=crop.device))
    mean = similarity.sum(dim=-1) / others
    # As the code: over the whole crop row, the token's own (zeroed) entry included.
    variance = ((similarity - mean[..., None]).square() * same).sum(dim=-1) / others
    scaled = attention.float() * 1e3
    scale = crop_mean(scaled.abs()) / (crop_mean(variance.abs()) + EPS)
    crop_scores = crop_mean(scaled + alpha * variance * scale[:, crop])
    crop_scores = torch.where(size > 1, crop_scores, crop_mean(attention.float()))  # the code's one-token crops
    weights = crop_scores / (crop_scores.sum(dim=1, keepdim=True) + EPS)
    share = (weights * keep).floor().long()
    # The `keep - sum` tokens the floors leave go one each to the crops of largest weight (first wins ties).
    order = torch.sort(weights, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(crops, device=crop.device).expand_as(order))
    share = share + (rank < keep - share.sum(dim=1, keepdim=True)).long()
    # Within each crop, its `share` most attended tokens (first wins ties).
    n = crop.shape[0]
    earlier = torch.arange(n, device=crop.device)
    above = (attention[:, None, :] > attention[:, :, None]) | (
        (attention[:, None, :] == attention[:, :, None]) & (earlier[None, :] < earlier[:, None]))
    kept = (above & same).sum(dim=-1) < share.gather(1, crop.expand(share.shape[0], -1))
    # A crop given more than it holds keeps all it holds; the slots left go to the most attended tokens left.
    rest = attention.float().masked_fill(kept, -float("inf"))
    order = torch.sort(rest, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, earlier.expand_as(order))
    return kept | (rank < keep - kept.sum(dim=1, keepdim=True))


class HoloV(PruningStrategy):
    """HoloV, one selection before the LLM; the budget is the count kept.

    Per crop: token score t_i = 1000 a_i + alpha * v_i * mean(1000 a) / (mean(v) + 1e-6), a the head-mean
    attention at `layer`, v_i the variance of token i's cosine similarities (projected tokens) within its crop;
    the crop's score is the mean of t. Crops share the budget in proportion to their scores (floors, the rest one
    each to the largest), and each keeps its most attended tokens. Where a crop is given more than it holds the
    code loses the excess and pads the image with zero tokens; here the excess goes to the most attended tokens
    left, so the budget is exact. Kept tokens keep their original order (the code emits them crop by crop, each
    by descending attention) and are renumbered (the LLaVA code; the Qwen code keeps their positions).
    """

    name = "holov"
    Params = HoloVParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    observes = frozenset({"vision_attention"})
    vision_layer_params = ("layer",)

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return () if budget == num_visual else (Stage(after_layer=None, keep=budget),)

    def kept(self, contexts: Sequence[ScoreContext]) -> torch.Tensor:
        """[B, n] bool, the picks of images of one size (and one grid)."""
        first = contexts[0]
        n, keep = first.tokens.shape[0], first.stage.keep
        crops = self.params.crops or max(1, int(1024 * n / (576 * keep)))
        crop, crops = crop_index(n, crops, first.grid, self.params.partition, first.tokens.device)
        attention = torch.stack([ctx.observe("vision_attention", layer=self.params.layer).float().mean(dim=0)
                                 for ctx in contexts])
        return holov_keep(torch.stack([ctx.tokens for ctx in contexts]), attention, crop, crops, keep,
                          self.params.alpha)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.kept([ctx])[0].float()

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts) or len({ctx.grid for ctx in contexts}) > 1:
            return super().select_images(contexts)
        keep = contexts[0].stage.keep
        return [Selection(keep=row) for row in true_indices(self.kept(contexts), keep)]


@hookimpl
def register_strategies(register):
    register(HoloV)
