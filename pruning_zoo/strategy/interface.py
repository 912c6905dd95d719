"""The one interface every pruning method implements.

A strategy is a small object: it says where it acts (`plan`), scores the visual tokens of one image at each
of those stages (`score`) and turns scores into the tokens to keep (`select`, top-k in original order unless
overridden). The engine does everything else: it locates the image tokens, hands the strategy what it asked
to observe, applies the selection to the model and records the budget it achieved.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from pruning_zoo.errors import InvalidParameterError, PruningZooError
from pruning_zoo.strategy.budget import BudgetMeaning
from pruning_zoo.strategy.params import InLLMParams, StrategyParams, build_params
from pruning_zoo.strategy.tensors import top_k_in_order

__all__ = ["LLM_OBSERVATIONS", "OBSERVATIONS", "VISION_OBSERVATIONS", "VISION_STAGE_OBSERVATIONS", "ModelIdentity",
           "PruningStrategy", "ScoreContext", "Selection", "Stage", "SublayerIO", "checked_scores", "describe_stages",
           "one_size", "plan_stages", "stages_that_prune"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One place where a strategy prunes, and how many visual tokens per image survive it."""

    #: None: after the vision encoder and projector, before the LLM. k: after decoder layer k (0-indexed),
    #: so layers 0..k see the tokens and layer k+1 onwards runs without the dropped ones.
    after_layer: int | None
    #: Visual tokens per image kept by this stage (inside the vision tower: merge units, one per visual token).
    keep: int
    #: j: inside the vision tower, after its block j (0-indexed; `after_layer` is then None): the tower's blocks
    #: after j run on `keep` merge units per image. Such a stage merges (`Selection.into`); at the tower's exit
    #: each visual token gets its merge group's features and the engine keeps one token per group before the LLM.
    vision_block: int | None = None

    @property
    def in_llm(self) -> bool:
        return self.after_layer is not None

    @property
    def in_vision(self) -> bool:
        return self.vision_block is not None

    @property
    def before_llm(self) -> bool:
        """After the vision tower and projector, before the LLM."""
        return self.after_layer is None and self.vision_block is None

    def __repr__(self) -> str:  # the field inside the vision tower only where set: plans print as they always did
        tower = "" if self.vision_block is None else f", vision_block={self.vision_block!r}"
        return f"Stage(after_layer={self.after_layer!r}, keep={self.keep!r}{tower})"

    def __str__(self) -> str:
        if self.vision_block is not None:
            where = f"after vision block {self.vision_block}"
        else:
            where = "before the LLM" if self.after_layer is None else f"after layer {self.after_layer}"
        return f"{where}: keep {self.keep}"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The visual tokens one stage keeps for one image."""

    #: Indices into the stage's visual tokens, ascending (original order), one per kept token.
    keep: torch.Tensor
    #: Replacement features for the kept slots (a merge plan, e.g. VisionZip's contextual tokens), shaped
    #: [len(keep), dim]; None keeps the tokens as they are.
    features: torch.Tensor | None = None
    #: [len(keep)] bool, True where a slot only lends its place to a token that is none of the stage's (VisionZip's
    #: CLS): the record then counts that slot as no kept patch. None: every slot holds its own token (or a merge of it).
    borrowed: torch.Tensor | None = None
    #: Only at a stage inside the vision tower, where it is required: [n] int64, for each of the stage's n tokens
    #: the position in `keep` of the kept token it merges into (a kept token: its own). The engine averages each
    #: group's rows weighted by their sizes (the original units they hold) and carries the sizes on.
    into: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class SublayerIO:
    """One decoder layer's sub-blocks at prefill, for the whole batch: what `summarize_sublayers` reads."""

    #: The attention sub-block's input (input_layernorm's output) and output (before the residual add), [B, L, d].
    attn_in: torch.Tensor
    attn_out: torch.Tensor
    #: The MLP sub-block's input (post_attention_layernorm's output) and output, [B, L, d].
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    #: [B, L] which positions of the layer's sequence are real tokens (not padding).
    valid: torch.Tensor


class ModelIdentity:
    """A model's name and a fingerprint of its vision tower's first weights, which tells checkpoints apart
    whatever path they were loaded from (computed on first use, in bfloat16 so the load dtype does not matter)."""

    def __init__(self, name: str, vision_module: torch.nn.Module):
        self.name = name
        self._vision_module = vision_module

    @functools.cached_property
    def fingerprint(self) -> str:
        weight = next(self._vision_module.parameters()).detach()
        data = weight.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        return hashlib.sha256(str(tuple(weight.shape)).encode() + data).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ModelIdentity({self.name!r})"


@dataclasses.dataclass
class ScoreContext:
    """What the engine hands a strategy about one image at one stage."""

    stage: Stage
    #: This image's visual tokens as they stand at the stage, [n, dim]: projected features before the LLM,
    #: hidden states inside it.
    tokens: torch.Tensor
    #: Decoder layers of the language model.
    num_layers: int
    #: (rows, cols) when `tokens` are one full patch grid in raster order, else None.
    grid: tuple[int, int] | None = None
    #: Which model this is (for strategies with learned parts trained for one model).
    model: ModelIdentity | None = None
    #: Named extra tensors the strategy declared in `observes`, computed by the engine on first use.
    observations: Mapping[str, Callable[[], torch.Tensor]] = dataclasses.field(default_factory=dict)
    #: A stable name of this image (its document and place in it) when the caller gave one: seeded strategies
    #: draw from it, so a document gets the same draw whatever its batch, order or process.
    image_key: str | None = None

    def observe(self, name: str, **options) -> torch.Tensor:
        """An engine observation by name, e.g. `ctx.observe("vision_attention", layer=-2)`."""
        if name not in self.observations:
            raise PruningZooError(
                f"observation {name!r} is not available {self.stage}; the strategy must list it in "
                f"`observes` and the model family must provide it. available here: "
                f"{', '.join(sorted(self.observations)) or '(none)'}"
            )
        return self.observations[name](**options)


def checked_scores(strategy: PruningStrategy, ctx: ScoreContext) -> torch.Tensor:
    """`strategy.score(ctx)`, refused unless it is one score per visual token."""
    scores = strategy.score(ctx)
    if scores.shape != (ctx.tokens.shape[0],):
        raise PruningZooError(
            f"strategy {strategy.name!r} returned scores of shape {tuple(scores.shape)} {ctx.stage}; "
            f"expected one score per visual token, shape ({ctx.tokens.shape[0]},)"
        )
    return scores


def stages_that_prune(stages: Sequence[Stage], num_visual: int) -> tuple[Stage, ...]:
    """The stages that drop tokens, in order: one keeping every token that enters it would still score and
    select, for nothing (a schedule's early stages do at large budgets)."""
    kept, entering = [], num_visual
    for stage in stages:
        if stage.keep < entering:
            kept.append(stage)
            entering = stage.keep
    return tuple(kept)


def plan_stages(strategy: PruningStrategy, budget: int, num_visual: int, num_layers: int,
                vision_blocks: int | None = None) -> tuple[Stage, ...]:
    """`strategy.plan(...)`, handing a strategy that plans inside the vision tower its depth (`plans_vision`)."""
    if strategy.plans_vision:
        return strategy.plan(budget, num_visual, num_layers, vision_blocks=vision_blocks)
    return strategy.plan(budget, num_visual, num_layers)


def describe_stages(stages: Sequence[Stage]) -> str:
    """The stages as text, one per stage, a run of stages inside the vision tower as one ("after vision blocks 0-21:
    keep 553 down to 64"); "" for none."""
    parts, tower = [], [stage for stage in stages if stage.in_vision]
    if len(tower) > 1:
        parts.append(f"after vision blocks {tower[0].vision_block}-{tower[-1].vision_block}: keep {tower[0].keep} "
                     f"down to {tower[-1].keep}")
    parts += [str(stage) for stage in stages if len(tower) < 2 or not stage.in_vision]
    return "; ".join(parts)


def one_size(contexts: Sequence[ScoreContext]) -> bool:
    """Whether the images of a stage hold as many tokens and keep as many: their work can be stacked."""
    return bool(contexts) and len({(ctx.tokens.shape[0], ctx.stage.keep) for ctx in contexts}) == 1


#: Observations of the vision tower, before the LLM (docs/plugins.md, "Observations").
VISION_OBSERVATIONS = frozenset(
    {"vision_attention", "vision_keys", "vision_features", "vision_project", "vision_cls_features"}
)
#: Observations at an in-LLM stage.
LLM_OBSERVATIONS = frozenset(
    {"last_token_attention", "received_attention", "instruction_attention", "next_layer_instruction_attention",
     "sublayer_summary", "next_layer_last_token_attention", "stage_keys", "stage_output_final_norm",
     "instruction_attention_rows"}
)
#: Observations of the language model's input sequence at the stage before the LLM (CDPruner's instruction).
INPUT_OBSERVATIONS = frozenset({"instruction_embeddings"})
#: Observations at a stage inside the vision tower (`Stage.vision_block`).
VISION_STAGE_OBSERVATIONS = frozenset({"block_keys", "unit_sizes"})
#: Every name a strategy may list in `observes`.
OBSERVATIONS = VISION_OBSERVATIONS | LLM_OBSERVATIONS | VISION_STAGE_OBSERVATIONS | INPUT_OBSERVATIONS


class PruningStrategy(ABC):
    """Base class of every strategy. A subclass sets the class attributes and implements plan and score."""

    #: Registry name, lower-case (`pruning-zoo list` shows it; suites and the CLI use it).
    name: ClassVar[str]
    #: The parameter dataclass, a subclass of StrategyParams.
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    #: What the budget counts; the leaderboard reports both, but compares by this one.
    budget_meaning: ClassVar[BudgetMeaning]
    #: Names of engine observations `score` uses (see ScoreContext.observe and OBSERVATIONS); any collection of
    #: names, made a frozenset when the strategy is registered.
    observes: ClassVar[frozenset[str]] = frozenset()
    #: True when `select_images` computes its picks on the host at every call (a seeded draw, say): the
    #: segmented prefill then runs it eagerly, never in a CUDA graph, which would replay one call's picks.
    selects_on_host: ClassVar[bool] = False
    #: Parameters that name a block of the vision tower (negative: from its end): a dry run checks them against
    #: each model's vision depth, where `plan` sees only the decoder's.
    vision_layer_params: ClassVar[tuple[str, ...]] = ()
    #: True when `plan` may place stages inside the vision tower (`Stage(None, keep, vision_block=j)`): the engine
    #: then calls `plan(budget, num_visual, num_layers, vision_blocks=m)`, m being the tower's blocks a merge after
    #: block j (0 <= j <= m - 2) makes cheaper for the model (LLaVA's CLIP: the blocks up to its feature layer).
    plans_vision: ClassVar[bool] = False

    def __init__(self, params: StrategyParams | Mapping[str, Any] | None = None):
        if isinstance(params, StrategyParams):
            if not isinstance(params, self.Params):
                raise InvalidParameterError(
                    f"strategy {self.name!r} takes {self.Params.__name__}, not {type(params).__name__}"
                )
            self.params = params
        else:
            self.params = build_params(self.name, self.Params, params or {})
        if isinstance(self.params, InLLMParams):  # the instance's meaning follows its parameter
            self.budget_meaning = BudgetMeaning(self.params.budget_counts)
        if not isinstance(self.observes, frozenset):  # a class used without registering it (which does the same)
            self.observes = frozenset(self.observes)

    @abstractmethod
    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        """The stages, in forward order, that bring `num_visual` tokens per image down to `budget`.

        `budget` is already resolved to a token count and means what `budget_meaning` says.
        """

    @abstractmethod
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """One score per visual token of the image, shaped [n]; higher is kept first by `select`."""

    def select(self, scores: torch.Tensor, keep: int, ctx: ScoreContext) -> Selection:
        """Turn scores into the kept tokens. Default: top-k, original order kept."""
        return Selection(keep=top_k_in_order(scores, keep))

    def select_images(self, contexts: Sequence[ScoreContext]) -> list[Selection]:
        """The selections of every image of a batch at one stage, in order: what the engine calls. Default: each
        image scored and selected on its own. A strategy may override it to do the work once for the batch
        (in a CUDA graph every small kernel per image costs time); images of one size can be stacked."""
        return [self.select(checked_scores(self, ctx), ctx.stage.keep, ctx) for ctx in contexts]

    def proportional_attention(self) -> bool:
        """At stages inside the vision tower: whether the blocks after a merge add log(size) of each key (the original
        units it holds) to their attention logits (ToMe's proportional attention), where the tower's attention takes a
        mask (CLIP). Default False."""
        return False

    # For strategies that observe `sublayer_summary`: what each token of a layer's sequence did in its sub-blocks.
    def sublayer_layers(self, num_layers: int) -> range:
        """0-indexed decoder layers whose sub-blocks `summarize_sublayers` reads; only these are watched."""
        return range(0)

    def summarize_sublayers(self, io: SublayerIO) -> torch.Tensor:
        """One value per position of a watched layer's sequence, [B, L], for the whole batch at once: computed
        once per layer and forward, at the first stage after it, and read per image as `sublayer_summary`. A pure
        tensor function of `io` (no host reads, no side effects): the latency benchmark's compiled mode fuses it
        with torch.compile."""
        raise NotImplementedError(f"strategy {self.name!r} observes sublayer_summary but has no summarize_sublayers")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"
