"""A complete third-party pruning-zoo strategy: keep each image's visual tokens with the largest L2 norm.

Installed, it appears in `pruning-zoo list` as `feature-norm`, from distribution pruning-zoo-example.
"""

from typing import Literal

import pydantic
import torch

import pruning_zoo


@pruning_zoo.params_dataclass(frozen=True)
class FeatureNormParams(pruning_zoo.StrategyParams):
    order: Literal["largest", "smallest"] = pydantic.Field(
        default="largest", description="keep the tokens of largest or of smallest feature norm"
    )


class FeatureNorm(pruning_zoo.PruningStrategy):
    """Keeps the projected visual features of largest L2 norm, before the LLM."""

    name = "feature-norm"
    Params = FeatureNormParams
    budget_meaning = pruning_zoo.BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (pruning_zoo.Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        norms = torch.linalg.vector_norm(ctx.tokens.float(), dim=-1)
        return norms if self.params.order == "largest" else -norms


@pruning_zoo.hookimpl
def register_strategies(register):
    register(FeatureNorm)
