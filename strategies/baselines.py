"""Baselines every method is compared against: keep all, a seeded random subset, spatial average pooling."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

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
    top_k_in_order,
)


class KeepAll(PruningStrategy):
    """Keep every visual token: the unpruned reference. It must reproduce the model's logits exactly."""

    name = "none"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return ()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.ones(ctx.tokens.shape[0])


@params_dataclass(frozen=True)
class RandomParams(StrategyParams):
    seed: int = pydantic.Field(default=0, description="seed of the subset draw; the same seed gives the same subsets")


class RandomSubset(PruningStrategy):
    """A uniform random subset of each image's visual tokens before the LLM, seeded.

    Where the caller names the image (`ScoreContext.image_key`, as `pruning-zoo run` does with the document),
    the draw comes from a generator seeded by (seed, key): a document gets the same subset whatever its batch,
    order or process. Without a key each call draws afresh from one generator seeded at construction.
    Draws are made on the host, so they are the same on every device.
    """

    name = "random"
    Params = RandomParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    selects_on_host = True

    def __init__(self, params=None):
        super().__init__(params)
        self._generator = torch.Generator().manual_seed(self.params.seed)
        self._pinned: dict[torch.Size, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        generator = self._generator
        if ctx.image_key is not None:
            digest = hashlib.sha256(f"{self.params.seed}:{ctx.image_key}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(ctx.tokens.shape[0], generator=generator)

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        """Each image's draw as before, on the host; images of one size are ranked together and their picks
        copied to the device in one transfer."""
        if not one_size(contexts):
            return super().select_images(contexts)
        kept = top_k_in_order(torch.stack([self.score(ctx) for ctx in contexts]), contexts[0].stage.keep)
        device = contexts[0].tokens.device
        if device.type == "cuda":
            kept = self._copy_to_gpu(kept, device)
        return [Selection(keep=row) for row in kept.to(device)]

    def _copy_to_gpu(self, kept: torch.Tensor, device: torch.device) -> torch.Tensor:
        """From pinned memory, so that the host need not wait for the GPU: a buffer per shape, pinned once, reused
        once its last copy is done. Pinned at every call, some batch-8 selections on an H100 took 0.45-3.79 ms
        (fad43a3, e1f8e41); 0.03-0.04 ms since."""
        if kept.shape not in self._pinned:
            self._pinned[kept.shape] = torch.empty_like(kept).pin_memory(), torch.cuda.Event()
        buffer, copied = self._pinned[kept.shape]
        copied.synchronize()  # queued one prefill ago: long done
        buffer.copy_(kept)
        on_device = buffer.to(device, non_blocking=True)
        copied.record()
        return on_device


class GridPool(PruningStrategy):
    """Spatial average pooling of each image's patch grid down to the budget, before the LLM.

    The grid is pooled (adaptive average pooling) to the smallest square grid s x s with s*s >= budget; when
    the budget is not a perfect square, `budget` of the s*s pooled tokens are kept, evenly spaced in raster
    order, so the budget is honoured exactly. Tokens that do not form one grid (several crops, newline
    tokens) are pooled as a sequence. Pooled tokens take the first `budget` slots, renumbered contiguously.
    """

    name = "pool"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        # Pooling weighs every token equally; select() does the work.
        return torch.zeros(ctx.tokens.shape[0])

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        return self.pool_images([ctx], keep)[0]

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        """Images of one size and grid are pooled together."""
        if not one_size(contexts) or len({ctx.grid for ctx in contexts}) > 1:
            return super().select_images(contexts)
        return self.pool_images(contexts, contexts[0].stage.keep)

    @staticmethod
    def pool_images(contexts: Sequence[ScoreContext], keep: int) -> list[Selection]:
        tokens = torch.stack([ctx.tokens for ctx in contexts]).transpose(1, 2).float()  # [B, d, n]
        side = math.isqrt(keep - 1) + 1
        grid = contexts[0].grid
        if grid is not None:
            pooled = F.adaptive_avg_pool2d(tokens.unflatten(2, grid), (side, side)).flatten(2)
        else:
            pooled = F.adaptive_avg_pool1d(tokens, side * side)
        device = tokens.device  # indices made where the tokens are: nothing copied from the host
        chosen = torch.linspace(0, side * side - 1, keep, device=device).round().long()
        features = pooled.transpose(1, 2)[:, chosen].to(contexts[0].tokens.dtype)
        return [Selection(keep=torch.arange(keep, device=device), features=image) for image in features]


@hookimpl
def register_strategies(register):
    for strategy in (KeepAll, RandomSubset, GridPool):
        register(strategy)
