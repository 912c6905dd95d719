"""TransPrune (CVPR 2026; arXiv 2507.20630; code liaolea/TransPrune): progressive pruning inside the LLM,
scored by how much each token is transformed by the layers (Token Transition Variation, TTV) and by how much
the instruction attends to it through the next layer (Instruction-Guided Attention, IGA)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F

from pruning_zoo.errors import InvalidParameterError
from pruning_zoo.plugins.hookspecs import hookimpl
from pruning_zoo.strategy import (
    BudgetMeaning,
    InLLMParams,
    PruningStrategy,
    ScoreContext,
    Selection,
    Stage,
    SublayerIO,
    one_size,
    params_dataclass,
    stages_that_prune,
    top_k_in_order,
)


@params_dataclass(frozen=True)
class TransPruneParams(InLLMParams):
    prune_layers: tuple[int, ...] = pydantic.Field(
        default=(7, 9, 12),
        min_length=1,
        description="1-indexed decoder layers after which tokens are dropped, for a `reference_depth`-layer "
        "model (the code: after layers 7, 9 and 12 of Vicuna-7B's 32)",
    )
    keep_ratios: tuple[float, ...] = pydantic.Field(
        default=(0.875, 0.625, 0.125),
        min_length=1,
        description="share of the ORIGINAL visual tokens kept at each prune layer (the code: 0.875, 0.625, "
        "0.125, i.e. 504/360/72 of 576); scaled together to reach other budgets",
    )
    ttv_layers: tuple[int, int] = pydantic.Field(
        default=(7, 12),
        description="first and last 1-indexed layers whose TTV is accumulated (the code: 7..12)",
    )
    reference_depth: int = pydantic.Field(
        default=32, ge=1, description="depth the layer numbers are given for (LLaVA-1.5-7B's 32); other depths scale them"
    )
    alpha: float = pydantic.Field(
        default=0.5, ge=0.0, le=1.0,
        description="weight of normalised TTV against normalised IGA (the code adds them with equal weights)",
    )
    direction: Literal["code", "paper"] = pydantic.Field(
        default="code",
        description="direction term of TTV: 'code' 1 - cos(x, y); 'paper' 1 - |cos(x, y)| (Eq. 2)",
    )
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber", description="kept tokens are renumbered contiguously after each prune (the code)"
    )

    @pydantic.model_validator(mode="after")
    def _check_schedule(self):
        if len(self.prune_layers) != len(self.keep_ratios):
            raise ValueError(f"prune_layers {self.prune_layers} and keep_ratios {self.keep_ratios} must pair up one to one")
        if any(b <= a for a, b in zip(self.prune_layers, self.prune_layers[1:])) or self.prune_layers[0] < 1:
            raise ValueError(f"prune_layers {self.prune_layers} must be increasing 1-indexed layers")
        if any(not 0 < r <= 1 for r in self.keep_ratios) or any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise ValueError(f"keep_ratios {self.keep_ratios} must be non-increasing shares in (0, 1]")
        if not 1 <= self.ttv_layers[0] <= self.ttv_layers[1]:
            raise ValueError(f"ttv_layers {self.ttv_layers} must be a 1-indexed range first..last")
        return self


class TransPrune(PruningStrategy):
    """TransPrune. The code's schedule keeps 504, 360 and 72 of 576 tokens after layers 7, 9 and 12 (1-idx),
    averaging (7*576 + 2*504 + 3*360 + 20*72)/32 = 236.25 visual tokens per layer on LLaVA-1.5-7B.
    Other budgets scale every keep ratio by one factor (capped at 1): by default the budget is the count
    after the last prune (72 gives the code's schedule); with budget_counts='per_layer_average' the factor
    is chosen so that the average comes closest to the budget. Counts are floor(N * ratio); other depths
    scale the layer numbers by depth/32.

    At a prune after layer l (1-indexed):
    - TTV: for each accumulated layer <= l and each token, for the attention and the MLP sub-block, with x
      the normed sub-block input and y its output before the residual add: m = |y|/|x|, c = 1 - cos(x, y),
      p = softmax of c over all tokens of that layer's sequence; TTV = m*p summed over both sub-blocks and
      over the layers (each layer's values read at the image's current tokens).
    - IGA: layer l's output through layer l+1's norm, q/k projections and rotary tables; queries are the
      tokens after the image to the prompt's end; probability on each image key, averaged over heads and
      queries (computed for those rows only, so the model keeps SDPA).
    - score = alpha * TTV/sum(TTV) + (1 - alpha) * IGA/sum(IGA) over the image's current tokens; top-k.
    The code assumes batch size 1; here every image of a batch is scored on its own rows.
    """

    name = "transprune"
    Params = TransPruneParams
    budget_meaning = BudgetMeaning.AFTER_PRUNING
    observes = frozenset({"sublayer_summary", "next_layer_instruction_attention"})

    # -- schedule --------------------------------------------------------------------------------------------
    def scaled_layer(self, layer: int, num_layers: int) -> int:
        """A 1-indexed reference layer number at this depth (rounded half up)."""
        return max(1, math.floor(layer * num_layers / self.params.reference_depth + 0.5))

    def prune_layers(self, num_layers: int) -> list[int]:
        """1-indexed prune layers at this depth, kept strictly increasing and before the last layer."""
        layers = []
        for layer in self.params.prune_layers:
            layers.append(max(self.scaled_layer(layer, num_layers), layers[-1] + 1 if layers else 1))
        if layers[-1] > num_layers - 1:
            raise InvalidParameterError(
                f"transprune's {len(layers)} prune layers {self.params.prune_layers} do not fit a model of "
                f"{num_layers} decoder layers (they scale to {layers}; the last must be below {num_layers}); "
                "give fewer prune_layers/keep_ratios"
            )
        return layers

    def ttv_layers(self, num_layers: int) -> range:
        """0-indexed layers whose TTV is accumulated. A bound that is a prune layer (the code: 7..12, from the first
        prune to the last) follows that prune layer as scaled, so on any depth the window ends where it does
        relative to the schedule (6 layers: prunes after 1, 2, 3 and TTV over 1..3, not 1..2)."""
        scaled = dict(zip(self.params.prune_layers, self.prune_layers(num_layers)))
        first, last = (scaled.get(layer) or self.scaled_layer(layer, num_layers) for layer in self.params.ttv_layers)
        return range(first - 1, max(first, last))

    def counts(self, factor: float, num_visual: int) -> list[int]:
        counts, left = [], num_visual
        for ratio in self.params.keep_ratios:
            left = max(1, min(left, math.floor(num_visual * min(1.0, factor * ratio) + 1e-9)))
            counts.append(left)
        return counts

    @staticmethod
    def average(layers: list[int], counts: list[int], num_visual: int, num_layers: int) -> float:
        """Visual tokens per decoder layer: layers up to the first prune see all, then each count in turn."""
        bounds = [*layers, num_layers]
        total = layers[0] * num_visual + sum(c * (b - a) for c, a, b in zip(counts, bounds, bounds[1:]))
        return total / num_layers

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        if budget == num_visual:
            return ()
        layers = self.prune_layers(num_layers)
        if self.budget_meaning == BudgetMeaning.AFTER_PRUNING:
            counts = self.counts(budget / (num_visual * self.params.keep_ratios[-1]), num_visual)
            counts = [max(count, budget) for count in counts[:-1]] + [budget]  # exact despite float rounding
            return stages_that_prune([Stage(after_layer=layer - 1, keep=keep) for layer, keep in zip(layers, counts)],
                                     num_visual)
        lowest = self.average(layers, [1] * len(layers), num_visual, num_layers)
        if budget < lowest:
            raise InvalidParameterError(
                f"transprune cannot average {budget} visual tokens per layer: its first {layers[0]} layers see all "
                f"{num_visual}, so the lowest reachable average is {lowest:.1f}; raise the budget or prune earlier "
                "(prune_layers), or count the budget after pruning (budget_counts='after_pruning')"
            )
        # The average grows with the factor in steps: bisect for the first factor reaching the budget, then
        # take it or the step below, whichever lands closer.
        low, high = 0.0, 1.0 / min(self.params.keep_ratios)
        for _ in range(60):
            middle = (low + high) / 2
            if self.average(layers, self.counts(middle, num_visual), num_visual, num_layers) >= budget:
                high = middle
            else:
                low = middle
        candidates = [self.counts(low, num_visual), self.counts(high, num_visual)]
        best = min(candidates, key=lambda c: abs(self.average(layers, c, num_visual, num_layers) - budget))
        return stages_that_prune([Stage(after_layer=layer - 1, keep=keep) for layer, keep in zip(layers, best)],
                                 num_visual)

    # -- scores ----------------------------------------------------------------------------------------------
    def sublayer_layers(self, num_layers: int) -> range:
        return self.ttv_layers(num_layers)

    def summarize_sublayers(self, io: SublayerIO) -> torch.Tensor:
        """Each token's TTV at one layer, [B, L]: computed once per layer for the whole batch, however many
        prunes after it accumulate it."""
        return token_transition_variation(io, self.params.direction)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.scores([ctx])[0]

    def scores(self, contexts: Sequence[ScoreContext]) -> torch.Tensor:
        """[B, n] of images of one size, at one stage."""
        first = contexts[0]
        layers = [layer for layer in self.ttv_layers(first.num_layers) if layer <= first.stage.after_layer]
        ttv = torch.zeros(len(contexts), first.tokens.shape[0], device=first.tokens.device)
        for layer in layers:
            ttv += torch.stack([ctx.observe("sublayer_summary", layer=layer) for ctx in contexts])
        iga = torch.stack([ctx.observe("next_layer_instruction_attention") for ctx in contexts]).float().mean(dim=1)
        alpha = self.params.alpha
        return (alpha * ttv / (ttv.sum(dim=-1, keepdim=True) + 1e-8)
                + (1 - alpha) * iga / (iga.sum(dim=-1, keepdim=True) + 1e-8))

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        return [Selection(keep=row) for row in top_k_in_order(self.scores(contexts), contexts[0].stage.keep)]


def transition(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, direction: str) -> torch.Tensor:
    """m * softmax(c) per token for one sub-block: x its normed input, y its output, [..., L, d]; valid [..., L]."""
    x, y = x.float(), y.float()
    magnitude = y.norm(dim=-1) / x.norm(dim=-1)
    cosine = F.cosine_similarity(x, y, dim=-1)
    change = 1 - (cosine.abs() if direction == "paper" else cosine)
    return magnitude * change.masked_fill(~valid, float("-inf")).softmax(dim=-1)


def token_transition_variation(io: SublayerIO, direction: str = "code") -> torch.Tensor:
    """One layer's TTV (attention + MLP sub-blocks) at every position, [B, L]."""
    return (transition(io.attn_in, io.attn_out, io.valid, direction)
            + transition(io.mlp_in, io.mlp_out, io.valid, direction))


@hookimpl
def register_strategies(register):
    register(TransPrune)
