"""ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023; code facebookresearch/ToMe): bipartite soft
matching of the patches inside the vision tower, so that its later blocks run on fewer tokens; optionally FastV in
the LLM after it (`fastv_k`). Spec and code citations: docs/methods/tome.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pydantic
import torch

from pruning_zoo.errors import InvalidParameterError
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
    true_indices,
)

#: Vision blocks assumed where the engine gives no depth (a dry run): LLaVA-1.5's CLIP-L up to its feature layer.
REFERENCE_VISION_BLOCKS = 23


@params_dataclass(frozen=True)
class ToMeParams(StrategyParams):
    inflection: float = pydantic.Field(
        default=0.0, ge=-1.0, le=1.0,
        description="r schedule over the merging blocks, as the code's parse_r: 0 merges as many after each block "
        "(the default), -1 the paper's decreasing schedule (2r down to 0), +1 increasing")
    first_block: int = pydantic.Field(
        default=0, ge=0, description="first vision block (0-indexed) after which tokens merge; the code merges in every block")
    metric: Literal["keys", "hidden"] = pydantic.Field(
        default="keys",
        description="similarity of tokens: 'keys' (the code: the block's attention keys, mean over heads) or 'hidden' "
        "(the block's output hidden states, which costs no key projection)")
    prop_attn: bool = pydantic.Field(
        default=True, description="proportional attention: later blocks add log(size) to each key's logits "
        "(the code's apply_patch default; CLIP towers only: Qwen's vision attention takes no mask)")
    fastv_k: int | None = pydantic.Field(
        default=None, ge=1, description="then FastV in the LLM: after decoder layer fastv_k-1 keep `fastv_keep` of "
        "the merged tokens, by the last prompt token's attention (None: ToMe alone)")
    fastv_keep: float = pydantic.Field(default=0.5, gt=0.0, le=1.0, description="share of the merged tokens FastV keeps")


def schedule(total: int, blocks: int, inflection: float) -> list[int]:
    """Tokens merged after each of `blocks` blocks, summing to `total` exactly: the code's linear r schedule
    (min r(1-inflection) to max r(1+inflection)) with its cumulative sums rounded."""
    if blocks == 1:
        return [total]
    weights = [1 - inflection + 2 * inflection * i / (blocks - 1) for i in range(blocks)]
    cumulative = [round(total * sum(weights[: i + 1]) / sum(weights)) for i in range(blocks)]
    return [b - a for a, b in zip([0, *cumulative], cumulative)]


def bipartite_merge(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching on [G, n, c]: tokens alternate into sets A (even) and B (odd);
    each A token's edge goes to its most cosine-similar B token; the r A tokens with the most similar edges merge
    into their B token. Returns keep [G, n - r] (ascending) and into [G, n] (each token's place in keep)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [G, |A|, |B|]
    node_max, node_idx = scores.max(dim=-1)
    merged = node_max.topk(r, dim=-1).indices  # A tokens that merge (the code: argsort descending, first r)
    n = metric.shape[1]
    kept = torch.ones(metric.shape[:2], dtype=torch.bool, device=metric.device).scatter(1, 2 * merged, False)
    rank = kept.long().cumsum(dim=1) - 1  # place in keep of each kept token
    target = torch.arange(n, device=metric.device).expand(metric.shape[0], -1).clone()
    target = target.scatter(1, 2 * merged, 2 * node_idx.gather(1, merged) + 1)
    return true_indices(kept, n - r), rank.gather(1, target)


def merge_rounds(metric: torch.Tensor, sizes: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge [G, n, c] down to `keep` tokens: one bipartite round, or more where more than half must go (the code
    caps r at half and then keeps more; rounds keep the budget exact), each on the size-weighted mean metric."""
    G, n = metric.shape[:2]
    total_keep = torch.arange(n, device=metric.device).expand(G, -1)
    total_into = total_keep
    while n > keep:
        r = min(n - keep, n // 2)
        kept, into = bipartite_merge(metric, r)
        weighted = torch.zeros(G, n - r, metric.shape[-1], device=metric.device).scatter_add_(
            1, into[..., None].expand(-1, -1, metric.shape[-1]), metric * sizes[..., None])
        sizes = torch.zeros(G, n - r, device=metric.device).scatter_add_(1, into, sizes)
        metric, n = weighted / sizes[..., None], n - r
        total_keep, total_into = total_keep.gather(1, kept), into.gather(1, total_into)
    return total_keep, total_into


class ToMe(PruningStrategy):
    """ToMe inside the vision tower. The budget is the visual tokens entering the LLM per image: num_visual - budget
    merge units merge after vision blocks first_block..m-2 (m: the blocks the model reads), r per block by the code's
    schedule, and each merge group enters the LLM as one token. With `fastv_k`, FastV then keeps round(fastv_keep *
    budget) of them after decoder layer fastv_k-1 (the budget still counts the tokens entering the LLM)."""

    name = "tome"
    Params = ToMeParams
    budget_meaning = BudgetMeaning.ENTERING_LLM
    observes = frozenset({"block_keys", "unit_sizes", "last_token_attention"})
    plans_vision = True

    def plan(self, budget: int, num_visual: int, num_layers: int, vision_blocks: int | None = None) -> tuple[Stage, ...]:
        if budget == num_visual:  # keep-all: the unpruned model
            return ()
        depth = REFERENCE_VISION_BLOCKS if vision_blocks is None else vision_blocks
        blocks = list(range(self.params.first_block, depth - 1))
        stages, left = [], num_visual
        if not blocks:
            raise InvalidParameterError(f"tome.first_block={self.params.first_block} leaves no vision block to merge "
                                        f"after: the model reads blocks 0..{depth - 1} and merges after 0..{depth - 2}")
        for block, r in zip(blocks, schedule(num_visual - budget, len(blocks), self.params.inflection)):
            if r > 0:
                left -= r
                stages.append(Stage(after_layer=None, keep=left, vision_block=block))
        if self.params.fastv_k is not None:
            if self.params.fastv_k >= num_layers:
                raise InvalidParameterError(f"tome.fastv_k={self.params.fastv_k} must be below the model's {num_layers} decoder layers")
            keep = max(1, round(self.params.fastv_keep * budget))
            if keep < budget:
                stages.append(Stage(after_layer=self.params.fastv_k - 1, keep=keep))
        return tuple(stages)

    def proportional_attention(self) -> bool:
        return self.params.prop_attn

    def _metric(self, contexts: Sequence[ScoreContext]) -> torch.Tensor:
        if self.params.metric == "hidden":
            return torch.stack([ctx.tokens for ctx in contexts]).float()
        return torch.stack([ctx.observe("block_keys").float().mean(dim=1) for ctx in contexts])  # mean over heads

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.stage.in_llm:  # FastV: the last prompt token's attention, mean over heads
            return ctx.observe("last_token_attention").float().mean(dim=0)
        metric = self._metric([ctx])[0]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = (metric[::2] @ metric[1::2].T).max(dim=-1).values
        scores = torch.full((metric.shape[0],), float("inf"), device=metric.device)  # B tokens always stay
        return scores.index_copy(0, torch.arange(0, metric.shape[0], 2, device=metric.device), -similarity)

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        if not one_size(contexts):
            return [selection for ctx in contexts for selection in self.select_images([ctx])]
        stage = contexts[0].stage
        if stage.in_llm:
            scores = torch.stack([self.score(ctx) for ctx in contexts])
            return [Selection(keep=row) for row in top_k_in_order(scores, stage.keep)]
        sizes = torch.stack([ctx.observe("unit_sizes") for ctx in contexts]).float()
        keep, into = merge_rounds(self._metric(contexts), sizes, stage.keep)
        return [Selection(keep=k, into=i) for k, i in zip(keep, into)]


@hookimpl
def register_strategies(register):
    register(ToMe)
