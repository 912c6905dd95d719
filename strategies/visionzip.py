"""VisionZip (Yang et al., CVPR 2025; code dvlab-research/VisionZip): before the LLM, keep the dominant
tokens the vision encoder's CLS attends to most and merge the rest into a few contextual tokens by key
similarity."""

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
    ascending,
    fp32_products,
    one_size,
    params_dataclass,
    top_k_mask,
    true_indices,
)


@params_dataclass(frozen=True)
class VisionZipParams(StrategyParams):
    contextual_ratio: float = pydantic.Field(
        default=10 / 64,
        ge=0.0,
        lt=1.0,
        description="share of the budget given to contextual (merged) tokens, rounded: the README's 54+10 at "
        "64 tokens; 108+20 at 128 and 162+30 at 192 (a third-party convention) follow the same ratio",
    )
    layer: int = pydantic.Field(
        default=-2,
        description="vision block whose attention and keys are read: -2, CLIP layer 22 of 24, the one LLaVA "
        "feeds the projector (the code's `vision_feature_layer=-2`)",
    )
    merge: Literal["code", "mean"] = pydantic.Field(
        default="code",
        description="'code': a contextual token is its target plus the mean of the tokens assigned to it "
        "(the code); 'mean': the plain average of the target and its members",
    )
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber",
        description="the merged sequence enters the LLM with contiguous positions (the code builds a new "
        "sequence of dominant then contextual tokens)",
    )


class VisionZip(PruningStrategy):
    """VisionZip, before the LLM; the budget counts the tokens entering it.

    1. Dominant: s_j = the sum over heads of the CLS attention on token j at `layer`. Where the model has a
       CLS token that is no visual token (LLaVA-1.5), CLS counts as one dominant token, as in the code (a
       budget of 64 is CLS + 53 patches + 10 contextual); elsewhere the dominant tokens are the top patches.
       Without CLS (Qwen2-VL, Qwen2.5-VL) s_j is the mean attention the token's patches receive, pooled per
       2x2 merge unit (our adaptation; not in the official code).
    2. Contextual: the remaining tokens R in original order, keys (k_proj at `layer`, mean over heads)
       L2-normalised; targets are R[0], R[step], ... (step = max(1, |R| // C)), the first C of them; every
       other token of R joins its most similar target (argmax of cosine, first wins ties).
    3. Features are merged before the projector (the code merges CLIP hidden states) and projected by the
       model's own projector. The LLM sees [dominant (original order, CLS first), contextual (target order)],
       placed in the slots of the kept patches with contiguous positions.

    LLaVA-NeXT: the official code treats the base crop and the other crops separately and drops the newline
    tokens; here every packed token of the image (newlines included, with no CLS attention) is one pool.
    """

    name = "visionzip"
    Params = VisionZipParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    vision_layer_params = ("layer",)
    observes = frozenset({"vision_attention", "vision_keys", "vision_features", "vision_project", "vision_cls_features"})

    def split(self, budget: int, with_cls: bool) -> tuple[int, int]:
        """(dominant, contextual) counts for a budget; dominant includes CLS where the model has it."""
        contextual = round(budget * self.params.contextual_ratio)
        contextual = min(contextual, budget - 1) if with_cls else contextual
        return budget - contextual, contextual

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.observe("vision_attention", layer=self.params.layer).float().sum(dim=0)

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        return self.merge_images([ctx], scores[None], keep)[0]

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        """Images of one size (and alike in having a CLS row) are merged together, each step once for the batch."""
        if not one_size(contexts) or len({"vision_cls_features" in ctx.observations for ctx in contexts}) > 1:
            return super().select_images(contexts)
        scores = torch.stack([self.score(ctx) for ctx in contexts])
        return self.merge_images(contexts, scores, contexts[0].stage.keep)

    def merge_images(self, contexts: Sequence[ScoreContext], scores: torch.Tensor, keep: int) -> list[Selection]:
        """The selections of images of one size, scores [B, n]: steps 1-3 above, batched."""
        first = contexts[0]
        batch, count = scores.shape
        with_cls = "vision_cls_features" in first.observations
        dominant_count, contextual_count = self.split(keep, with_cls)
        patches = dominant_count - 1 if with_cls else dominant_count
        is_dominant = top_k_mask(scores, patches)
        dominant = true_indices(is_dominant, patches)  # [B, patches], ascending
        remaining = true_indices(~is_dominant, count - patches)

        features = torch.stack([ctx.observe("vision_features") for ctx in contexts])  # [B, n, ...]
        emitted = [gather_rows(features, dominant)]
        if with_cls:
            emitted.insert(0, torch.stack([ctx.observe("vision_cls_features") for ctx in contexts])[:, None])
        targets = remaining[:, :0]
        if contextual_count:
            keys = torch.stack([ctx.observe("vision_keys", layer=self.params.layer) for ctx in contexts]).float().mean(dim=2)
            picked, merged = merge_contextual(gather_rows(keys, remaining), gather_rows(features, remaining),
                                              contextual_count, self.params.merge)
            targets = remaining[:, picked]
            emitted.append(merged)
        emitted = torch.cat(emitted, dim=1)
        # The projector is the model's own, the same for every image: one call projects the batch.
        projected = first.observe("vision_project", features=emitted.flatten(0, 1)).view(batch, keep, -1)

        slots = torch.cat([dominant, targets], dim=1)
        borrowed = [None] * batch
        if with_cls:  # CLS has no slot of its own: it takes the first free one, which holds no kept patch
            free = torch.ones(batch, count, dtype=torch.bool, device=scores.device)
            free.scatter_(1, slots, False)
            lent = true_indices(free, 1)
            slots = torch.cat([lent, slots], dim=1)
        # The slots are ascending; the emitted order goes into them in turn, so the sequence order is VisionZip's.
        kept = ascending(slots, count)
        if with_cls:
            borrowed = kept == lent
        return [Selection(keep=k, features=image, borrowed=b) for k, image, b in zip(kept, projected, borrowed)]


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, n, ...] at rows index [B, k]: [B, k, ...]."""
    return values.gather(1, index.view(*index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:]))


def merge_contextual(keys: torch.Tensor, features: torch.Tensor, count: int, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge over the remaining tokens, in their original order.

    keys: [r, dk]; features: [r, ...]. Returns (target indices into the r tokens, merged features [count, ...]).
    A batch of images with as many remaining tokens, keys [B, r, dk] and features [B, r, ...], gives the
    targets (the same for every image) and merged features [B, count, ...].
    """
    if keys.dim() == 2:
        targets, merged = merge_contextual(keys[None], features[None], count, merge)
        return targets, merged[0]
    normed = F.normalize(keys, dim=-1)
    remaining = keys.shape[1]
    step = max(1, remaining // count)
    targets = torch.arange(0, remaining, step, device=keys.device)[:count]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=keys.device)
    is_target.index_fill_(0, targets, True)
    members = true_indices(~is_target, remaining - targets.shape[0])
    assignment = (normed[:, members] @ normed[:, targets].transpose(1, 2)).argmax(dim=2)  # first maximum wins ties
    flat = features.flatten(2)
    # Each target's members summed as one matrix product with the assignment's one-hot [B, count, members]: exact
    # products summed in fp32, in a fixed order, where a scatter-add's atomics on a GPU sum in no fixed order.
    joins = (assignment[:, None, :] == torch.arange(count, device=keys.device)[None, :, None]).to(flat.dtype)
    sums = fp32_products(joins, flat[:, members])
    counts = joins.sum(dim=2, dtype=torch.float32)[..., None]
    at_targets = flat[:, targets].float()
    if merge == "code":
        merged = at_targets + torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    else:
        merged = (at_targets + sums) / (counts + 1)
    return targets, merged.to(features.dtype).view(flat.shape[0], count, *features.shape[2:])


@hookimpl
def register_strategies(register):
    register(VisionZip)
