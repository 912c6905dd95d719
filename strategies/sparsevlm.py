"""SparseVLM (Zhang et al., ICML 2025; code Gumpest/SparseVLMs, v1.5): progressive pruning inside the LLM, the
image tokens rated by the attention of the text tokens relevant to the image (the raters), and part of the
deleted tokens recycled into a few merged tokens (docs/methods/sparsevlm.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pydantic
import torch

from pruning_zoo.errors import InvalidParameterError
from pruning_zoo.plugins.hookspecs import hookimpl
from pruning_zoo.strategy import (
    BudgetMeaning,
    InLLMParams,
    PruningStrategy,
    ScoreContext,
    Selection,
    Stage,
    ascending,
    fp32_products,
    one_size,
    params_dataclass,
    stages_that_prune,
    top_k_mask,
    true_indices,
)

#: The code's schedule (score.py): RETAIN_TOKN -> image tokens chosen by top-k at its three prune layers, of 576.
CODE_SCHEDULES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
CODE_TOKENS = 576


@params_dataclass(frozen=True)
class SparseVLMParams(InLLMParams):
    prune_layers: tuple[int, int, int] = pydantic.Field(
        default=(2, 6, 15),
        description="0-indexed decoder layers whose output is pruned, for a `reference_depth`-layer model (the "
        "code's pruning_loc [2, 6, 15] of Vicuna-7B's 32); other depths scale them",
    )
    reference_depth: int = pydantic.Field(
        default=32, ge=1, description="depth the layer numbers are given for (LLaVA-1.5-7B's 32)")
    raters: Literal["relevant", "all"] = pydantic.Field(
        default="relevant",
        description="'relevant': the text tokens after the image whose attention mass on the image is above the "
        "mean rate it, from the stage's attention (the paper, Eqs. 5-6, and the code pick them once before the "
        "LLM by embedding similarity, which no in-LLM observation offers); 'all': every one",
    )
    recycle: bool = pydantic.Field(default=True, description="merge part of the deleted tokens back (the code, v1.5)")
    recycle_ratio: float = pydantic.Field(
        default=0.3, ge=0.0, le=1.0,
        description="of d deleted tokens the int(ratio*d)+1 best rated are recycled (the code: top 30%)")
    cluster_ratio: float = pydantic.Field(
        default=0.1, ge=0.0, le=1.0,
        description="m recycled tokens are clustered into int(ratio*m)+1 merged tokens (the code: m/10 + 1)")
    budget_counts: Literal["after_pruning", "per_layer_average"] = pydantic.Field(
        default="after_pruning",
        description="'after_pruning': the tokens left after the last stage (the code's RETAIN_TOKN 192/128/96/64 "
        "leave 113/39/27/18 of 576); 'per_layer_average': the average over decoder layers, each layer counted "
        "with the tokens it runs on (closest reachable)",
    )
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber", description="the pruned sequence is renumbered contiguously (the code, v1.5)")

    @pydantic.model_validator(mode="after")
    def _check_layers(self):
        if self.prune_layers[0] < 0 or any(b <= a for a, b in zip(self.prune_layers, self.prune_layers[1:])):
            raise ValueError(f"prune_layers {self.prune_layers} must be increasing 0-indexed layers")
        return self


class SparseVLM(PruningStrategy):
    """SparseVLM v1.5 (the code's default mode). After each prune layer (2, 6, 15 of 32; scaled by depth):
    - raters: the text tokens after the image whose attention on the image (mean over heads, summed over the
      image) is above their mean (the paper and the code pick them once, by input-embedding similarity, which
      no in-LLM observation offers); score_j = the raters' mean attention (mean over heads) on image token j;
    - keep the top-k, deleted d = n - k; recycle the int(0.3 d)+1 best rated deleted tokens, clustered by
      DPC-KNN into int(0.1 m)+1 tokens, each the mean of its members, placed after the kept image tokens.
    A stage's `keep` counts kept plus merged tokens (the code's v_token_num); k is the largest count whose
    recycling brings the total to `keep` exactly. No rank-based ratio (v1): the v1.5 table is the schedule. The
    budget is the exact count after the last stage, as for FastV and PyramidDrop here; the code's RETAIN_TOKN
    192/128/96/64 are its schedules ending at 113/39/27/18 of 576 (309/204/113 ... 82/32/18), which those
    budgets reproduce exactly; other counts interpolate the earlier totals between the code's schedules in the
    last count's share of the tokens. With budget_counts='per_layer_average' the budget is the engine's average
    over layers (each counted with the tokens it runs on; the code's 'Equal Tokens' counts a prune layer with
    its pruned tokens, so its 192 is the engine's 206.5).
    """

    name = "sparsevlm"
    Params = SparseVLMParams
    budget_meaning = BudgetMeaning.AFTER_PRUNING
    observes = frozenset({"instruction_attention_rows"})

    # -- schedule --------------------------------------------------------------------------------------------
    def prune_layers(self, num_layers: int) -> list[int]:
        layers = []
        for layer in self.params.prune_layers:
            scaled = math.floor(layer * num_layers / self.params.reference_depth + 0.5)
            layers.append(max(scaled, layers[-1] + 1 if layers else 0))
        if layers[-1] > num_layers - 2:
            raise InvalidParameterError(
                f"sparsevlm's prune layers {self.params.prune_layers} scale to {layers} on {num_layers} decoder "
                f"layers; the last must be below {num_layers - 1}: give earlier prune_layers")
        return layers

    def recycling(self, n: int, kept: int) -> tuple[int, int]:
        """(recycled, merged): of n tokens, `kept` kept by score, how many deleted ones the code recycles and into
        how many merged tokens (modelling_sparse_llama.py: int(0.3 d)+1 of the d deleted, int(m/10)+1 clusters)."""
        if not self.params.recycle or kept >= n:
            return 0, 0
        recycled = min(n - kept, int(self.params.recycle_ratio * (n - kept)) + 1)
        return recycled, min(recycled, int(self.params.cluster_ratio * recycled) + 1)

    def split(self, n: int, total: int) -> tuple[int, int, int]:
        """(kept by score, recycled, merged) for a stage bringing n tokens to `total` = kept + merged: the largest
        kept count that lands on the total exactly (without recycling where none does)."""
        for kept in range(total - 1, -1, -1) if self.params.recycle and total < n else ():
            recycled, merged = self.recycling(n, kept)
            if kept + merged == total:
                return kept, recycled, merged
        return total, 0, 0

    def anchors(self) -> list[tuple[float, tuple[float, ...]]]:
        """(last total, stage totals), as shares of the tokens, of each of the code's schedules, plus keep-all."""
        points = []
        for chosen in CODE_SCHEDULES.values():
            totals, n = [], CODE_TOKENS
            for kept in chosen:
                n = kept + self.recycling(n, kept)[1]
                totals.append(n / CODE_TOKENS)
            points.append((totals[-1], tuple(totals)))
        return sorted(points) + [(1.0, (1.0, 1.0, 1.0))]

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        layers = self.prune_layers(num_layers)
        if budget == num_visual:
            return ()
        if self.budget_meaning == BudgetMeaning.AFTER_PRUNING:
            return self.schedule(budget, num_visual, layers)
        # The average as the engine counts it (a layer with the tokens it runs on), monotone in the last count:
        # bisect for the schedule whose average is closest to the budget.
        def average(last: int) -> float:
            return layer_average(self.schedule(last, num_visual, layers), num_visual, num_layers)

        lowest = average(1)
        if budget < lowest:
            raise InvalidParameterError(
                f"sparsevlm cannot average {budget} visual tokens per layer: its first {layers[0] + 1} layers see "
                f"all {num_visual}, so the lowest reachable average is {lowest:.1f}; raise the budget or count "
                "it after pruning (budget_counts='after_pruning')")
        low, high = 1, num_visual - 1
        while low < high:
            middle = (low + high) // 2
            low, high = (middle + 1, high) if average(middle) < budget else (low, middle)
        last = min((low, max(low - 1, 1)), key=lambda count: (abs(average(count) - budget), -count))
        return self.schedule(last, num_visual, layers)

    def schedule(self, last: int, num_visual: int, layers: list[int]) -> tuple[Stage, ...]:
        """The stages ending at exactly `last` tokens: the earlier totals interpolated, in the last total's share
        of the tokens, between the code's schedules (and keep-all); below its smallest, that one scaled."""
        share, points = last / num_visual, self.anchors()
        if share <= points[0][0]:
            fractions = [f * share / points[0][0] for f in points[0][1]]
        else:
            (low, below), (high, above) = next((a, b) for a, b in zip(points, points[1:]) if share <= b[0])
            weight = (share - low) / (high - low)
            fractions = [a + weight * (b - a) for a, b in zip(below, above)]
        totals, left = [], num_visual
        for fraction in fractions[:-1]:
            left = max(last, min(left, round(fraction * num_visual)))
            totals.append(left)
        return stages_that_prune([Stage(after_layer=layer, keep=keep) for layer, keep in zip(layers, totals + [last])],
                                 num_visual)

    # -- scores and selection --------------------------------------------------------------------------------
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        rows = ctx.observe("instruction_attention_rows").float().mean(dim=0)  # [r, n], mean over heads (the code)
        if rows.shape[0] == 0:  # no text after the image: nothing rates, keep the first tokens
            return -torch.arange(rows.shape[1], dtype=torch.float32, device=rows.device)
        raters = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        if self.params.raters == "relevant":
            mass = rows.sum(dim=1)
            raters = mass > mass.mean()
            raters = raters | ~raters.any()  # all equal: every text token rates
        weights = raters.float()
        return (weights @ rows) / weights.sum()

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        return self.prune_images([ctx], scores[None], keep)[0]

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        scores = torch.stack([self.score(ctx) for ctx in contexts])  # each image's rows can differ in number
        return self.prune_images(contexts, scores, contexts[0].stage.keep)

    def prune_images(self, contexts: Sequence[ScoreContext], scores: torch.Tensor, total: int) -> list[Selection]:
        """Selections of images of one size, scores [B, n]: top-k, then the recycled tokens merged after them."""
        n = scores.shape[1]
        kept_count, recycled_count, merged_count = self.split(n, total)
        is_kept = top_k_mask(scores, kept_count)
        kept = true_indices(is_kept, kept_count)
        if merged_count == 0:
            return [Selection(keep=row) for row in kept]
        deleted = true_indices(~is_kept, n - kept_count)  # [B, d], ascending
        best = true_indices(top_k_mask(scores.gather(1, deleted), recycled_count), recycled_count)
        recycled = deleted.gather(1, best)  # [B, m] the best rated deleted tokens
        tokens = torch.stack([ctx.tokens for ctx in contexts])  # [B, n, d]
        centers, merged = cluster_and_merge(tokens.take_along_dim(recycled[..., None], 1), merged_count)
        # The merged tokens take the slots of their centers; written into the ascending slots in this order, the
        # image block reads [kept tokens in order, merged tokens], as in the code.
        slots = ascending(torch.cat([kept, recycled.gather(1, centers)], dim=1), n)
        features = torch.cat([tokens.take_along_dim(kept[..., None], 1), merged.to(tokens.dtype)], dim=1)
        return [Selection(keep=k, features=f) for k, f in zip(slots, features)]


def layer_average(stages: Sequence[Stage], num_visual: int, num_layers: int) -> float:
    """Visual tokens per decoder layer, averaged, each layer counted with the tokens it runs on."""
    total, first, current = 0, 0, num_visual
    for stage in stages:
        total += current * (stage.after_layer + 1 - first)
        first, current = stage.after_layer + 1, stage.keep
    return (total + current * (num_layers - first)) / num_layers


def cluster_and_merge(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering of x [B, m, d] into `count` clusters, as the code's cluster_and_merge: distances
    |xi - xj|/sqrt(d); density exp(-mean squared distance to the `count` nearest, itself included); each token's
    distance to the nearest denser token (the largest distance where none is); centers the `count` largest
    distance*density, in that order; every token joins its nearest center, a center itself. Returns (centers
    [B, count] indices into m, merged [B, count, d] fp32: each cluster's mean). Equal densities are told apart by
    index (the earlier is denser) where the code adds random noise."""
    xf = x.float()
    distance = torch.cdist(xf, xf) / math.sqrt(x.shape[-1])  # [B, m, m]
    nearest = distance.topk(count, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [B, m]
    m = x.shape[1]
    order = torch.arange(m, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (order[None, :] < order[:, None]))  # [B, i, j]: j denser than i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    parent_distance = torch.where(denser, distance, farthest).min(dim=-1).values
    centers = torch.sort(parent_distance * density, dim=-1, descending=True, stable=True).indices[:, :count]
    joined = distance.gather(2, centers[:, None, :].expand(-1, m, -1)).argmin(dim=-1)  # [B, m]
    joined = joined.scatter(1, centers, torch.arange(count, device=x.device).expand_as(centers))
    joins = (joined[:, None, :] == torch.arange(count, device=x.device)[None, :, None]).to(xf.dtype)  # [B, count, m]
    merged = fp32_products(joins, xf) / joins.sum(dim=-1, keepdim=True)
    return centers, merged


@hookimpl
def register_strategies(register):
    register(SparseVLM)
