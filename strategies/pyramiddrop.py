"""PyramidDrop (Xing et al., CVPR 2025; arXiv 2410.17247; code Cooperx521/PyramidDrop): drop image tokens in
stages inside the LLM, each keeping those the last instruction token attends to most (docs/methods/pyramiddrop.md)."""

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
    one_size,
    params_dataclass,
    stages_that_prune,
    top_k_in_order,
)


@params_dataclass(frozen=True)
class PyramidDropParams(InLLMParams):
    layer_list: tuple[int, ...] = pydantic.Field(
        default=(8, 16, 24), min_length=1,
        description="1-indexed decoder layers after which tokens are ranked and dropped, for a `reference_depth`-layer "
        "model (the code's --layer_list [8,16,24] for Vicuna-7B's 32)",
    )
    keep_ratios: tuple[float, ...] = pydantic.Field(
        default=(0.5, 0.25, 0.125), min_length=1,
        description="share of the ORIGINAL image tokens kept after each of those layers (the code's "
        "--image_token_ratio_list [0.5,0.25,0.125], lambda=0.5); scaled together to reach other budgets",
    )
    reference_depth: int = pydantic.Field(
        default=32, ge=1, description="depth the layer numbers are given for (LLaVA-1.5-7B's 32); other depths scale them"
    )
    attention: Literal["next_layer", "stage_layer"] = pydantic.Field(
        default="next_layer",
        description="'next_layer': the stage layer's output through the NEXT layer's norm, q/k projections and "
        "rotary tables (the code); 'stage_layer': the stage layer's own attention row (not in the code)",
    )
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber", description="kept tokens are renumbered contiguously after each drop (the code)"
    )

    @pydantic.model_validator(mode="after")
    def _check_schedule(self):
        if len(self.layer_list) != len(self.keep_ratios):
            raise ValueError(f"layer_list {self.layer_list} and keep_ratios {self.keep_ratios} must pair up one to one")
        if self.layer_list[0] < 1 or any(b <= a for a, b in zip(self.layer_list, self.layer_list[1:])):
            raise ValueError(f"layer_list {self.layer_list} must be increasing 1-indexed layers")
        if any(not 0 < r <= 1 for r in self.keep_ratios) or any(b > a for a, b in zip(self.keep_ratios, self.keep_ratios[1:])):
            raise ValueError(f"keep_ratios {self.keep_ratios} must be non-increasing shares in (0, 1]")
        return self


class PyramidDrop(PruningStrategy):
    """PyramidDrop at prefill; decoding does not re-prune. The code's schedule keeps 288, 144 and 72 of 576 tokens
    after layers 8, 16 and 24 (1-indexed), an average of (8*576 + 8*288 + 8*144 + 8*72)/32 = 270 per layer.

    Score at a drop after layer l (1-indexed): layer l's output through layer l+1's input norm, q/k projections and
    rotary tables (current positions); the last prompt token's attention row (causal, fp32 softmax over every key),
    mean over heads, at the image's current tokens; keep the top-k in original order. Counts are floor(N * ratio)
    of the ORIGINAL N. Other budgets scale every ratio by one factor (capped at 1): by default the budget is the
    count after the last drop (72 gives the code's schedule); with budget_counts='per_layer_average' the factor
    whose average comes closest. Other depths scale the layer numbers by depth/reference_depth.
    """

    name = "pyramiddrop"
    Params = PyramidDropParams
    budget_meaning = BudgetMeaning.AFTER_PRUNING
    observes = frozenset({"next_layer_last_token_attention", "last_token_attention"})

    def layers(self, num_layers: int) -> list[int]:
        """1-indexed drop layers at this depth (rounded half up), strictly increasing and before the last layer."""
        layers = []
        for layer in self.params.layer_list:
            scaled = math.floor(layer * num_layers / self.params.reference_depth + 0.5)
            layers.append(max(scaled, layers[-1] + 1 if layers else 1))
        if layers[-1] > num_layers - 1:
            raise InvalidParameterError(
                f"pyramiddrop's layer_list {self.params.layer_list} does not fit a model of {num_layers} decoder "
                f"layers (it scales to {layers}; the last must be below {num_layers}); give fewer layer_list/keep_ratios"
            )
        return layers

    def counts(self, factor: float, num_visual: int) -> list[int]:
        counts, left = [], num_visual
        for ratio in self.params.keep_ratios:
            left = max(1, min(left, math.floor(num_visual * min(1.0, factor * ratio) + 1e-9)))
            counts.append(left)
        return counts

    @staticmethod
    def average(layers: list[int], counts: list[int], num_visual: int, num_layers: int) -> float:
        bounds = [*layers, num_layers]
        return (layers[0] * num_visual + sum(c * (b - a) for c, a, b in zip(counts, bounds, bounds[1:]))) / num_layers

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        layers = self.layers(num_layers)
        if budget == num_visual:
            return ()
        if self.budget_meaning == BudgetMeaning.AFTER_PRUNING:
            counts = self.counts(budget / (num_visual * self.params.keep_ratios[-1]), num_visual)
            counts = [max(count, budget) for count in counts[:-1]] + [budget]  # exact despite float rounding
        else:
            lowest = self.average(layers, [1] * len(layers), num_visual, num_layers)
            if budget < lowest:
                raise InvalidParameterError(
                    f"pyramiddrop cannot average {budget} visual tokens per layer: its first {layers[0]} layers see "
                    f"all {num_visual}, so the lowest reachable average is {lowest:.1f}; raise the budget, drop "
                    "earlier (layer_list) or count the budget after pruning (budget_counts='after_pruning')"
                )
            low, high = 0.0, 1.0 / min(self.params.keep_ratios)  # the average grows with the factor, in steps
            for _ in range(60):
                middle = (low + high) / 2
                reached = self.average(layers, self.counts(middle, num_visual), num_visual, num_layers) >= budget
                low, high = (low, middle) if reached else (middle, high)
            counts = min((self.counts(low, num_visual), self.counts(high, num_visual)),
                         key=lambda c: abs(self.average(layers, c, num_visual, num_layers) - budget))
        return stages_that_prune([Stage(after_layer=layer - 1, keep=keep) for layer, keep in zip(layers, counts)],
                                 num_visual)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.scores([ctx])[0]

    def scores(self, contexts: Sequence[ScoreContext]) -> torch.Tensor:
        """[B, n] of images of one size: the attention row, mean over heads."""
        name = "next_layer_last_token_attention" if self.params.attention == "next_layer" else "last_token_attention"
        return torch.stack([ctx.observe(name) for ctx in contexts]).float().mean(dim=1)

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        return [Selection(keep=row) for row in top_k_in_order(self.scores(contexts), contexts[0].stage.keep)]


@hookimpl
def register_strategies(register):
    register(PyramidDrop)
