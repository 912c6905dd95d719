"""LearnPruner (ICLR 2026; arXiv 2604.23950; no public code): a learned module ranks the vision encoder's
tokens before the LLM, a few diverse tokens are added, and text->vision attention at a middle layer prunes
again inside the LLM."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pydantic
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruning_zoo.errors import InvalidParameterError, PruningZooError
from pruning_zoo.plugins.hookspecs import hookimpl
from pruning_zoo.strategy import (
    BudgetMeaning,
    InLLMParams,
    PruningStrategy,
    ScoreContext,
    Selection,
    Stage,
    fp32_products,
    one_size,
    params_dataclass,
    stages_that_prune,
    top_k_in_order,
    top_k_mask,
    true_indices,
)

WEIGHTS, CONFIG = "learnpruner.safetensors", "learnpruner.json"


class LearnablePruningModule(nn.Module):
    """The Learnable Pruning Module: an MLP over vision-encoder output tokens giving (drop, keep) logits.

    With CLIP-L features (1024) and a hidden width of 512 it has 525,826 parameters (the paper: about 0.53M).
    """

    def __init__(self, feature_dim: int, hidden: int = 512):
        super().__init__()
        self.feature_dim, self.hidden = feature_dim, hidden
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[..., n, feature_dim] -> [..., n, 2] logits, column 1 = keep."""
        return self.mlp(features)

    def keep_margin(self, features: torch.Tensor) -> torch.Tensor:
        """The keep logit minus the drop logit, [..., n]: M_soft's keep probability is its sigmoid, so it ranks
        tokens as the probability does, without the probability's fp32 saturation (the testbed's trained module
        gives 571-575 of 576 tokens a probability of exactly 1.0, whose order would be the top-k's tie-break).
        One weighted sum over the hidden units (a two-column matrix product ran a 14 us cuBLAS kernel on an H100,
        for 576 tokens; the sum fuses with the GELU before it)."""
        first, activation, last = self.mlp
        hidden = activation(first(features))
        return (hidden * (last.weight[1] - last.weight[0])).sum(dim=-1) + (last.bias[1] - last.bias[0])

    def keep_probability(self, features: torch.Tensor) -> torch.Tensor:
        """M_soft's keep column: the softmax of two logits is the sigmoid of their difference."""
        return torch.sigmoid(self.keep_margin(features))

    def save(self, directory: str | Path, model_name: str, model_fingerprint: str, **metadata) -> Path:
        """Weights as safetensors plus a JSON config naming the model the module was trained for."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, directory / WEIGHTS)
        config = {"feature_dim": self.feature_dim, "hidden": self.hidden,
                  "model": {"name": model_name, "fingerprint": model_fingerprint}, **metadata}
        (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> tuple[LearnablePruningModule, dict]:
        directory = Path(directory)
        if not (directory / WEIGHTS).is_file() or not (directory / CONFIG).is_file():
            raise InvalidParameterError(
                f"learnpruner.module={str(directory)!r} holds no trained module: expected {WEIGHTS} and {CONFIG} "
                "there (written by `pruning-zoo train learnpruner --out DIR`)"
            )
        config = json.loads((directory / CONFIG).read_text())
        module = cls(config["feature_dim"], config["hidden"])
        module.load_state_dict(load_file(directory / WEIGHTS))
        return module.eval(), config


@params_dataclass(frozen=True)
class LearnPrunerParams(InLLMParams):
    module: str | None = pydantic.Field(
        default=None,
        description="directory of a trained module (learnpruner.safetensors + learnpruner.json); None runs "
        "an untrained module initialised from `seed` (a baseline for training, not the method)",
    )
    hidden: int = pydantic.Field(
        default=512, ge=1, description="hidden width of an untrained module's MLP (about 0.53M parameters on CLIP-L, as the paper reports)"
    )
    seed: int = pydantic.Field(default=0, description="initialisation seed of an untrained module")
    diversity_ratio: float = pydantic.Field(
        default=0.1, ge=0.0, lt=1.0,
        description="share of the stage-1 budget chosen by greedy max-min cosine distance (the paper: 10%)",
    )
    stage_ratio: float = pydantic.Field(
        default=3.0, ge=1.0, description="stage-1 tokens per stage-2 token (the paper: R1:R2 = 3)"
    )
    layer: int = pydantic.Field(
        default=12, ge=0,
        description="decoder layer (0-indexed) whose text->vision attention scores stage 2, the drop applying "
        "after it, for a `reference_depth`-layer model (the paper: the middle layer, 12 of 32)",
    )
    reference_depth: int = pydantic.Field(default=32, ge=1, description="depth `layer` is given for; other depths scale it")

    @pydantic.model_validator(mode="after")
    def _layer_within_reference(self):
        if self.layer >= self.reference_depth:
            raise ValueError(f"layer {self.layer} must be below reference_depth {self.reference_depth} (0-indexed)")
        return self
    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber",
        description="the paper does not say; the kept tokens enter the LLM as a contiguous sequence, as "
        "pre-LLM methods' code usually builds it",
    )


class LearnPruner(PruningStrategy):
    """LearnPruner. Stage 1 keeps R1 = 3*R2 tokens (at most all), stage 2 keeps R2. By default the budget is
    R2, the tokens left after both stages (the paper's "32 tokens, 5.5% of 576"); with
    budget_counts='per_layer_average' it is the average over the layers (R1 in layers 0..k, R2 after: with the
    paper's k=12 of 32 a budget of 32 keeps R1=52 then R2=18, an average of 31.8).

    Stage 1, before the LLM: the module's keep probability (softmax of its logits) on the vision-encoder
    features ranks the tokens (computed as the logits' difference, whose order it is, unsaturated in fp32); the
    top R1 - D are kept, and D = round(10% of R1) more are added greedily, each
    the remaining token farthest (max-min cosine distance on the same features) from those already kept.
    The vision encoder's attention is not used (the paper's point: it suffers from attention sinks).
    Stage 2, after layer k: mean over heads and over the text tokens after the image of their attention onto
    each kept token at layer k; top R2.
    A trained module is refused on a model other than the one it was trained for.
    """

    name = "learnpruner"
    Params = LearnPrunerParams
    budget_meaning = BudgetMeaning.AFTER_PRUNING
    observes = frozenset({"vision_features", "instruction_attention"})

    def __init__(self, params=None):
        super().__init__(params)
        self._module: LearnablePruningModule | None = None
        self._config: dict | None = None
        if self.params.module is not None:
            self._module, self._config = LearnablePruningModule.load(self.params.module)

    @classmethod
    def with_module(cls, module: LearnablePruningModule, **params) -> LearnPruner:
        """A strategy around a module in memory (one being trained): used as it is, for any model."""
        strategy = cls(params)
        strategy._module = module
        return strategy

    # -- schedule --------------------------------------------------------------------------------------------
    def stage_layer(self, num_layers: int) -> int:
        layer = math.floor(self.params.layer * num_layers / self.params.reference_depth + 0.5)
        return min(max(layer, 0), num_layers - 2)

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        if budget == num_visual:
            return ()
        k = self.stage_layer(num_layers)
        if self.budget_meaning == BudgetMeaning.AFTER_PRUNING:
            first = min(num_visual, math.floor(self.params.stage_ratio * budget + 0.5))
            return stages_that_prune([Stage(after_layer=None, keep=first), Stage(after_layer=k, keep=budget)], num_visual)
        early, late = k + 1, num_layers - k - 1
        total = budget * num_layers
        final = max(1, round(total / (self.params.stage_ratio * early + late)))
        first = round((total - late * final) / early)
        if first > num_visual:  # stage 1 cannot keep more than there is: the later layers take the rest
            first = num_visual
            final = round((total - early * num_visual) / late)
        first = min(max(first, 1), num_visual)
        final = min(max(final, 1), first)
        return stages_that_prune([Stage(after_layer=None, keep=first), Stage(after_layer=k, keep=final)], num_visual)

    # -- module ----------------------------------------------------------------------------------------------
    def module_for(self, ctx: ScoreContext, feature_dim: int) -> LearnablePruningModule:
        if self._module is None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(self.params.seed)
            try:
                self._module = LearnablePruningModule(feature_dim, self.params.hidden).eval()
            finally:
                torch.random.set_rng_state(generator_state)
        elif self._config is not None:
            trained_for = self._config["model"]
            if ctx.model is not None and trained_for["fingerprint"] != ctx.model.fingerprint:
                raise InvalidParameterError(
                    f"the learnpruner module in {self.params.module!r} was trained for {trained_for['name']!r} "
                    f"(fingerprint {trained_for['fingerprint']}), not for this model {ctx.model.name!r} "
                    f"(fingerprint {ctx.model.fingerprint}); train one for it with `pruning-zoo train learnpruner` "
                    "or point learnpruner.module at the module trained for this model"
                )
        if self._module.feature_dim != feature_dim:
            raise PruningZooError(
                f"the learnpruner module takes {self._module.feature_dim}-dim features, but this model's vision "
                f"encoder gives {feature_dim}"
            )
        return self._module

    def features(self, ctx: ScoreContext) -> torch.Tensor:
        """[n, dim] vision-encoder features of the image's tokens (Qwen's 2x2 merge units concatenated)."""
        return ctx.observe("vision_features").flatten(1)

    # -- scores ----------------------------------------------------------------------------------------------
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.stage.in_llm:
            return ctx.observe("instruction_attention").float().mean(dim=0)
        features = self.features(ctx)
        module = self.module_for(ctx, features.shape[-1]).to(features.device)
        with torch.no_grad():
            return module.keep_margin(features.float())  # ranks as the keep probability, unsaturated

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        """Images of one size are selected together. Before the LLM, the module, the top-k and each greedy pick
        run once for the batch (per image, the picks alone are 7 small kernels each); in the LLM, the text
        attention's head mean and the top-k."""
        if not one_size(contexts):
            return super().select_images(contexts)
        keep = contexts[0].stage.keep  # images of one size have one plan
        if contexts[0].stage.in_llm:
            scores = torch.stack([ctx.observe("instruction_attention") for ctx in contexts]).float().mean(dim=1)
            return [Selection(keep=row) for row in top_k_in_order(scores, keep)]
        features = torch.stack([self.features(ctx) for ctx in contexts])  # [B, n, f]
        module = self.module_for(contexts[0], features.shape[-1]).to(features.device)
        with torch.no_grad():
            scores = module.keep_margin(features.float())
        diverse = math.floor(self.params.diversity_ratio * keep + 0.5)
        return [Selection(keep=row) for row in kept_with_diverse(features, scores, keep - diverse, diverse)]

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        if ctx.stage.in_llm:
            return Selection(keep=top_k_in_order(scores, keep))
        diverse = math.floor(self.params.diversity_ratio * keep + 0.5)
        return Selection(keep=kept_with_diverse(self.features(ctx)[None], scores[None], keep - diverse, diverse)[0])


def max_min_diverse(features: torch.Tensor, selected: torch.Tensor, count: int) -> torch.Tensor:
    """Greedily pick `count` more rows of `features`: each time the unselected row whose smallest cosine
    distance to the selected rows is largest (first wins ties). With nothing selected, start from row 0.
    features [n, f] and selected [k] give [count]; a batch, [B, n, f] and [B, k], gives [B, count], every
    image picking at once. Picks stay on the device (no host sync), so the selection can be captured in a
    CUDA graph."""
    if features.dim() == 2:
        return max_min_diverse(features[None], selected[None], count)[0]
    taken = None
    if selected.shape[1]:
        taken = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device).scatter_(1, selected, True)
    picked, _ = _max_min_greedy(features, taken, count)
    if not picked:
        return torch.zeros(features.shape[0], 0, dtype=torch.long, device=features.device)
    return torch.stack(picked, dim=1)


def kept_with_diverse(features: torch.Tensor, scores: torch.Tensor, ranked: int, count: int) -> torch.Tensor:
    """The `ranked` highest-scored rows and `count` more picked as `max_min_diverse` picks them, ascending:
    [B, ranked + count] for features [B, n, f] and scores [B, n]. Read from the greedy's running minimum, which is
    -inf at every row taken, instead of stacking the picks (on a GPU a kernel each) and sorting."""
    taken = top_k_mask(scores, ranked) if ranked else None
    if not count:
        return true_indices(taken, ranked) if ranked else scores.new_zeros(scores.shape[0], 0, dtype=torch.long)
    _, nearest = _max_min_greedy(features, taken, count)
    return true_indices(torch.isneginf(nearest), ranked + count)


def _max_min_greedy(features: torch.Tensor, taken: torch.Tensor | None, count: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The picks ([B] each) after the rows `taken` marks ([B, n] bool; None: none, and row 0 is picked first),
    and every row's smallest distance to the rows taken, -inf at those ([B, n])."""
    batch, n, _ = features.shape
    picked = []
    if taken is None:
        if not count:
            return [], None
        first = torch.zeros(batch, dtype=torch.long, device=features.device)
        taken = torch.zeros(batch, n, dtype=torch.bool, device=features.device).scatter_(1, first[:, None], True)
        picked, count = [first], count - 1
    distance = cosine_distances(features)
    # A row's distance to itself is -inf: taking a row puts -inf in its own running minimum, where it stays,
    # so it never wins a pick again.
    distance.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    nearest = distance.masked_fill(~taken[:, None, :], float("inf")).min(dim=2).values
    for _ in range(count):
        best = nearest.argmax(dim=1, keepdim=True)  # [B, 1]; the first of equal distances wins
        picked.append(best[:, 0])
        nearest = torch.minimum(nearest, distance.gather(2, best[:, None, :].expand(-1, n, -1))[..., 0])
    return picked, nearest


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of every pair of rows, [B, n, n] for [B, n, f] (a few MB at LLaVA's 576 tokens), in
    fp32. The products of the features themselves, scaled by their norms: in their own bf16 on a GPU they run on
    tensor cores exactly (`fp32_products`), where normalised first, in fp32, they took 22 us of SIMT on an H100."""
    norms = features.float().norm(dim=-1).clamp_min(1e-12)
    similarity = fp32_products(features, features.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :])
    return 1 - similarity


@hookimpl
def register_strategies(register):
    register(LearnPruner)
