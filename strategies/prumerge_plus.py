"""PruMerge+ (Shang et al., "LLaVA-PruMerge", ICCV 2025; code 42Shawn/LLaVA-PruMerge): before the LLM, keep the
tokens whose CLS attention is an outlier (IQR) plus spatially uniform samples, each merged with its most similar
tokens by key similarity, weighted by their attention, and one extra token summing the pruned ones
(docs/methods/prumerge_plus.md)."""

from __future__ import annotations

import math
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
    ascending,
    one_size,
    params_dataclass,
    true_indices,
)


@params_dataclass(frozen=True)
class PruMergePlusParams(StrategyParams):
    layer: int = pydantic.Field(
        default=-1,
        description="vision block whose CLS attention and keys are read: -1, the last CLIP block (the code hooks "
        "layers[23] of 24), whose input is the penultimate block's output that LLaVA projects",
    )
    attention: Literal["code", "mean"] = pydantic.Field(
        default="code",
        description="'code': the code's one-head attention over the heads' concatenated q and k (scale 1/sqrt(width)), "
        "i.e. a softmax of sum_h log p_h / sqrt(heads), renormalised over the image's tokens; 'mean': the heads' mean",
    )
    iqr_factor: float = pydantic.Field(
        default=1.5, ge=0.0, description="outliers: attention above Q3 + iqr_factor * (Q3 - Q1) (the code's 1.5)")
    neighbors: int = pydantic.Field(
        default=32, ge=0, description="tokens merged into each kept token: its most key-similar others (the code's 32)")
    extra_token: bool = pydantic.Field(
        default=True, description="one more token, the attention-weighted sum of the pruned tokens (the code); it "
        "counts inside the budget")
    order: Literal["code", "spatial"] = pydantic.Field(
        default="code", description="the order the LLM sees: 'code': outliers by descending attention, then the samples, "
        "then the extra token (the code's sequence); 'spatial': kept tokens in original order, then the extra token")


def cls_attention(per_head: torch.Tensor, rule: str) -> torch.Tensor:
    """[B, heads, n] probabilities -> [B, n]. 'code': q.k/sqrt(width) = sum_h q_h.k_h / sqrt(heads * head_dim) is the
    heads' scaled logits summed over sqrt(heads), so its softmax is that of sum_h log p_h / sqrt(heads)."""
    if rule == "mean":
        return per_head.float().mean(dim=1)
    logs = per_head.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return (logs.sum(dim=1) / math.sqrt(per_head.shape[1])).softmax(dim=-1)


def iqr_outliers(scores: torch.Tensor, factor: float) -> torch.Tensor:
    """[B, n] bool: scores above Q3 + factor * IQR, quartiles interpolated linearly (numpy.percentile's default)."""
    ordered = scores.sort(dim=-1).values
    n = scores.shape[-1]

    def quantile(q: float) -> torch.Tensor:
        position = q * (n - 1)
        low = math.floor(position)
        high = min(low + 1, n - 1)
        return ordered[..., low] + (ordered[..., high] - ordered[..., low]) * (position - low)

    q1, q3 = quantile(0.25), quantile(0.75)
    return scores > (q3 + factor * (q3 - q1))[..., None]


def kept_tokens(scores: torch.Tensor, outliers: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] indices in the code's order: the outliers by descending score, at most `count`; then as many tokens
    as are missing, evenly spaced in raster order over the tokens that are no outliers (index floor(j * rest / fill))."""
    n = scores.shape[-1]
    ranked = torch.sort(scores + 2.0 * outliers, dim=-1, descending=True, stable=True).indices[..., :count]
    taken = outliers.sum(dim=-1, keepdim=True).clamp(max=count)  # [B, 1]
    rest = n - outliers.sum(dim=-1, keepdim=True)
    fill = (count - taken).clamp(min=1)
    others = true_indices(~outliers, n)  # non-outliers ascending first
    j = torch.arange(count, device=scores.device)
    samples = others.gather(-1, ((j - taken).clamp(min=0) * rest // fill).clamp(max=n - 1))
    return torch.where(j < taken, ranked, samples)


class PruMergePlus(PruningStrategy):
    """PruMerge+, one merge before the LLM; the budget counts the tokens entering it, the extra token included.

    The code's count is adaptive (outliers m, then about 3m raster samples at stride int(int(576/m)/3), then one extra
    token). Here the budget is exact: of budget - 1 kept tokens (budget with `extra_token` off), the outliers come
    first by descending attention, cut to the count; the rest are evenly spaced in raster order over the non-outliers
    (the code samples at a raster stride too; here the count sets it, not m). Every kept token becomes its projector input plus the attention-
    weighted sum of its `neighbors` most key-similar other tokens (cosine of the block's keys, heads concatenated);
    the extra token is the attention-weighted sum of the pruned tokens. Merged inputs are projected by the model's own
    projector. Without CLS (Qwen2-VL, Qwen2.5-VL) the attention is the engine's mean received attention.
    """

    name = "prumerge_plus"
    Params = PruMergePlusParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    vision_layer_params = ("layer",)
    observes = frozenset({"vision_attention", "vision_keys", "vision_features", "vision_project"})

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return () if budget == num_visual else (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        per_head = ctx.observe("vision_attention", layer=self.params.layer)[None]
        return cls_attention(per_head, self.params.attention)[0]

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        return self.merge_images([ctx], scores[None], keep)[0]

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        per_head = torch.stack([ctx.observe("vision_attention", layer=self.params.layer) for ctx in contexts])
        return self.merge_images(contexts, cls_attention(per_head, self.params.attention), contexts[0].stage.keep)

    def merge_images(self, contexts: Sequence[ScoreContext], scores: torch.Tensor, keep: int) -> list[Selection]:
        """The selections of images of one size, scores [B, n]."""
        params = self.params
        batch, n = scores.shape
        extra = 1 if params.extra_token and keep > 1 else 0
        kept = kept_tokens(scores, iqr_outliers(scores, params.iqr_factor), keep - extra)  # [B, k]
        if params.order == "spatial":
            kept = ascending(kept, n)
        features = torch.stack([ctx.observe("vision_features") for ctx in contexts])  # [B, n, ...]
        flat = features.flatten(2).float()
        merged = flat.gather(1, kept[..., None].expand(-1, -1, flat.shape[-1]))
        neighbors = min(params.neighbors, n - 1)
        if neighbors:
            keys = F.normalize(torch.stack([ctx.observe("vision_keys", layer=params.layer) for ctx in contexts])
                               .flatten(2).float(), dim=-1)  # [B, n, heads * head_dim]
            similarity = keys.gather(1, kept[..., None].expand(-1, -1, keys.shape[-1])) @ keys.transpose(1, 2)
            similarity.scatter_(2, kept[..., None], -float("inf"))  # never a token itself
            nearest = similarity.topk(neighbors, dim=2).indices  # [B, k, neighbors]
            weights = torch.zeros_like(similarity).scatter_(2, nearest, scores[:, None].expand_as(similarity).gather(2, nearest))
            merged = merged + weights @ flat
        rows, slots, borrowed = [merged], kept, [None] * batch
        if extra:
            is_kept = torch.zeros(batch, n, dtype=torch.bool, device=scores.device).scatter_(1, kept, True)
            rows.append((scores * ~is_kept)[:, None] @ flat)
            # The extra token has no slot of its own: it borrows the last free one.
            lent = n - 1 - true_indices(is_kept.flip(1).logical_not(), 1)
            slots = torch.cat([kept, lent], dim=1)
        emitted = torch.cat(rows, dim=1).to(features.dtype).view(batch, keep, *features.shape[2:])
        projected = contexts[0].observe("vision_project", features=emitted.flatten(0, 1)).view(batch, keep, -1)
        # The rows fill the ascending slots in turn, so the LLM sees them in the emitted order.
        slots = ascending(slots, n)
        if extra:
            borrowed = slots == lent
        return [Selection(keep=k, features=image, borrowed=b) for k, image, b in zip(slots, projected, borrowed)]


@hookimpl
def register_strategies(register):
    register(PruMergePlus)
