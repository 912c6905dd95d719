"""CDPruner (Zhang et al., NeurIPS 2025; code Theia-4869/CDPruner): before the LLM, keep the visual tokens a
conditional DPP picks: a kernel of the tokens' cosine similarity weighted by each token's relevance to the
instruction, its MAP subset found greedily (docs/methods/cdpruner.md)."""

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
    one_size,
    params_dataclass,
)

#: Floor of a pivot's remaining gain under the square root: past the kernel's rank the gains are rounding noise.
GAIN_FLOOR = 1e-10


@params_dataclass(frozen=True)
class CDPrunerParams(StrategyParams):
    relevance: Literal["negated", "similar"] = pydantic.Field(
        default="negated",
        description="'negated': a token's relevance is minus its mean cosine similarity to the instruction (the "
        "code, llava_arch.py line 159, which the authors found right for CLIP); 'similar': plus (the paper's text)",
    )
    theta: float | None = pydantic.Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="None: the kernel weights tokens by the min-max normalised relevance r (the code); a value: by "
        "exp(alpha*r) with alpha = theta/(2(1-theta)) (the code's commented-out option, lines 163-166)",
    )


def dpp_greedy(kernel: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] indices into [B, n, n] PSD kernels: each step the item whose addition gives the largest
    determinant of the picked set's kernel (fast greedy MAP, Chen et al. 2018: incremental Cholesky rows). `gains`
    holds each item's squared distance from the picked items' span, its determinant gain; picked items are
    never picked again."""
    batch, n = kernel.shape[:2]
    rows = torch.arange(batch, device=kernel.device)
    factors = kernel.new_zeros(steps, batch, n)  # the Cholesky rows of the picked items, one per step
    gains = kernel.diagonal(dim1=1, dim2=2).clone()
    picks = []
    for step in range(steps):
        pick = gains.argmax(dim=1)
        picks.append(pick)
        row = kernel[rows, pick]
        if step:
            row = row - torch.einsum("sb,sbn->bn", factors[:step, rows, pick], factors[:step])
        factor = row / gains[rows, pick].clamp(min=GAIN_FLOOR).sqrt()[:, None]
        factors[step] = factor
        gains = (gains - factor.square()).scatter(1, pick[:, None], -float("inf"))
    return torch.stack(picks, dim=1)


class CDPruner(PruningStrategy):
    """CDPruner, one selection before the LLM (the code's only mode); the budget is the count kept.

    Kernel L = diag(r) S diag(r): S the cosine similarity of the projected visual tokens (the code's
    `mm_projector` output), r each token's relevance, min-max normalised over the image as the code does
    ((r - min + 1e-6) / (max - min)). The code's relevance compares CLIP's projected patch embeddings with CLIP's
    text embedding of the question; transformers' VLMs load no CLIP text tower, so here it is the cosine of each
    projected visual token with the LLM's input embedding of each token after the image (`instruction_embeddings`:
    the question and the template's tail), averaged, negated as in the code by default. With no such token every
    relevance is 1 (plain DPP). The greedy MAP picks exactly the budget; kept tokens keep their original order and
    are renumbered (the code builds a new sequence). LLaVA-NeXT: one DPP over the whole packed image, newline
    tokens included (the code runs one per crop at the per-crop budget and keeps every newline).
    """

    name = "cdpruner"
    Params = CDPrunerParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    observes = frozenset({"instruction_embeddings"})

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return () if budget == num_visual else (Stage(after_layer=None, keep=budget),)

    def relevance(self, ctx: ScoreContext, unit: torch.Tensor) -> torch.Tensor:
        """[n] the kernel's weight of each token, from its unit-norm features `unit` [n, d]."""
        text = ctx.observe("instruction_embeddings")
        if text.shape[0] == 0:
            return unit.new_ones(unit.shape[0])
        cosine = (unit @ F.normalize(text.float(), dim=-1).T).mean(dim=1)
        relevance = -cosine if self.params.relevance == "negated" else cosine
        low, high = relevance.min(), relevance.max()
        relevance = (relevance - low + 1e-6) / (high - low).clamp(min=1e-6)  # a constant relevance would divide by 0
        if self.params.theta is not None:
            relevance = torch.exp(self.params.theta / (2 * (1 - self.params.theta)) * relevance)
        return relevance

    def picks(self, contexts: Sequence[ScoreContext], keep: int) -> torch.Tensor:
        """[B, keep] the DPP's picks, in pick order, for images of one size."""
        unit = F.normalize(torch.stack([ctx.tokens for ctx in contexts]).float(), dim=-1)
        relevance = torch.stack([self.relevance(ctx, image) for ctx, image in zip(contexts, unit)])
        kernel = relevance[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance[:, None, :]
        return dpp_greedy(kernel, keep)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """The picks as a score: the first pick scores `keep`, the last 1, the rest 0."""
        keep = ctx.stage.keep
        scores = torch.zeros(ctx.tokens.shape[0], device=ctx.tokens.device)
        return scores.index_copy(0, self.picks([ctx], keep)[0],
                                 torch.arange(keep, 0, -1, dtype=scores.dtype, device=scores.device))

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        keep, n = contexts[0].stage.keep, contexts[0].tokens.shape[0]
        return [Selection(keep=ascending(row, n)) for row in self.picks(contexts, keep)]


@hookimpl
def register_strategies(register):
    register(CDPruner)
