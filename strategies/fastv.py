"""FastV (Chen et al., ECCV 2024; code pkunlp-icler/FastV): drop the least-attended image tokens after
layer K-1, scored by the attention the last prompt token pays them at that layer."""

from __future__ import annotations

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
    top_k_in_order,
)


@params_dataclass(frozen=True)
class FastVParams(InLLMParams):
    k: int = pydantic.Field(
        default=2,
        ge=1,
        description="full layers K: layers 0..K-1 see every token, the pruned sequence enters layer K "
        "(paper: K=2; lmms-eval and the HF demo use K=3)",
    )
    score: Literal["last_token", "received_mean"] = pydantic.Field(
        default="last_token",
        description="'last_token': mean over heads of the last prompt token's attention at layer K-1 (the "
        "code); 'received_mean': mean attention each image token receives from all tokens (paper text)",
    )
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="keep", description="kept tokens keep their original position ids, with gaps (the code)"
    )


class FastV(PruningStrategy):
    """FastV, one drop at prefill; decoding does not re-prune (the HF and lmms-eval code with a KV cache).

    Defaults: K=2 (the paper; lmms-eval and the HF demo use K=3), the code's score (the last prompt token's
    attention at layer K-1, mean over heads, no renormalisation), original positions with gaps (the code).
    The budget is the exact number of image tokens kept from layer K on (METHODS.md: "the budget is the exact
    keep count"; VisionZip's and DART's tables place FastV so). With budget_counts='per_layer_average' it is
    the average over the L layers instead: K layers see all N, so k = round((budget*L - K*N) / (L-K)).
    The original no-cache code re-selects at every decoding step with the newest token as the query: under
    the engine that is `generate(use_cache=False)`, where every step is a prefill.
    """

    name = "fastv"
    Params = FastVParams
    budget_meaning = BudgetMeaning.AFTER_PRUNING
    observes = frozenset({"last_token_attention", "received_attention"})

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        k = self.params.k
        if k >= num_layers:
            raise InvalidParameterError(
                f"fastv.k={k} must be below the model's {num_layers} decoder layers"
            )
        if budget == num_visual:
            return ()
        if self.budget_meaning == BudgetMeaning.AFTER_PRUNING:
            return (Stage(after_layer=k - 1, keep=budget),)
        keep = round((budget * num_layers - k * num_visual) / (num_layers - k))
        if keep < 1:
            lowest = (k * num_visual + (num_layers - k)) / num_layers
            raise InvalidParameterError(
                f"fastv cannot average {budget} visual tokens per layer: its first {k} layers see all "
                f"{num_visual}, so the lowest reachable average is {lowest:.1f}; raise the budget, lower fastv.k or count the budget after pruning (budget_counts='after_pruning')"
            )
        return (Stage(after_layer=k - 1, keep=keep),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.scores([ctx])[0]

    def scores(self, contexts: Sequence[ScoreContext]) -> torch.Tensor:
        """[B, n] of images of one size."""
        observation = "last_token_attention" if self.params.score == "last_token" else "received_attention"
        # [heads, n] post-softmax probabilities onto each image's tokens; FastV averages over heads.
        return torch.stack([ctx.observe(observation) for ctx in contexts]).float().mean(dim=1)

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return super().select_images(contexts)
        return [Selection(keep=row) for row in top_k_in_order(self.scores(contexts), contexts[0].stage.keep)]


@hookimpl
def register_strategies(register):
    register(FastV)
