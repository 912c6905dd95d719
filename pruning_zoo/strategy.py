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
from typing import Any, ClassVar, Literal

import pydantic
import torch
from pydantic.dataclasses import dataclass as params_dataclass

from pruning_zoo.budget import BudgetMeaning
from pruning_zoo.errors import InvalidParameterError, PruningZooError, closest
from pruning_zoo.inputs import parse_yaml, shown

__all__ = [
    "BudgetMeaning",
    "InLLMParams",
    "PruningStrategy",
    "ScoreContext",
    "Selection",
    "Stage",
    "StrategyParams",
    "checked_scores",
    "one_size",
    "SublayerIO",
    "params_dataclass",
    "top_k_in_order",
    "top_k_mask",
    "fp32_products",
    "true_indices",
    "ascending",
]


@params_dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))
class StrategyParams:
    """Base of every strategy's parameters: a validated, frozen dataclass.

    Subclass it with `@params_dataclass(frozen=True)`, give each field the paper's default and a
    `pydantic.Field(description=...)` that cites where the default comes from.
    """

    positions: Literal["keep", "renumber"] = pydantic.Field(
        default="renumber",
        description="position ids of kept tokens after a drop: 'keep' the original ones (gaps) or "
        "'renumber' them contiguously (M-RoPE: each image's kept tokens keep their 3-D layout and the tokens "
        "after it close the gap)",
    )


@params_dataclass(frozen=True)
class InLLMParams(StrategyParams):
    """Parameters of strategies that prune inside the LLM, whose budget can count two things."""

    budget_counts: Literal["after_pruning", "per_layer_average"] = pydantic.Field(
        default="after_pruning",
        description="what the budget counts: 'after_pruning' the visual tokens left after the last stage (how "
        "VisionZip's and DART's tables place FastV), 'per_layer_average' the average over all decoder layers "
        "(FLOPs-fair, how in-LLM papers compare)",
    )


@dataclasses.dataclass(frozen=True)
class Stage:
    """One place where a strategy prunes, and how many visual tokens per image survive it."""

    #: None: after the vision encoder and projector, before the LLM. k: after decoder layer k (0-indexed),
    #: so layers 0..k see the tokens and layer k+1 onwards runs without the dropped ones.
    after_layer: int | None
    #: Visual tokens per image kept by this stage.
    keep: int

    @property
    def in_llm(self) -> bool:
        return self.after_layer is not None

    def __str__(self) -> str:
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


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending so kept tokens keep their original order ([n] -> [k],
    or a batch [B, n] -> [B, k])."""
    return true_indices(top_k_mask(scores, k), k)


#: Up to this many entries a compiled selection ranks scores (`top_k_mask`) and counts mask entries
#: (`true_indices`) pairwise: B x n x n comparisons, which inductor fuses into reductions without materialising
#: them. Beyond it, or run eagerly, a stable sort ranks and a scan counts.
PAIRWISE_LIMIT = 2048


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k highest scores along the last dimension ([n] or [B, n]); of equal scores the first wins. In a
    compiled selection a score's rank is the number of higher ones and of equal ones before it, counted for every
    pair: on an H100 torch.topk's radix select took 9 us of each TransPrune stage (scripts/profile_prefill.py).
    Eagerly (a selection on the host, say) a stable sort is the cheaper way to the same ranks."""
    n = scores.shape[-1]
    if torch.compiler.is_compiling() and n <= PAIRWISE_LIMIT:
        order = torch.arange(n, device=scores.device)
        other, own = scores[..., None, :], scores[..., :, None]  # [.., i, j]: does score j rank above score i?
        # NaN ranks above every number, as in the sort: a NaN compares unequal to everything, so without this
        # each would count no score above it and the mask would hold more than k.
        other_nan, own_nan = other.isnan(), own.isnan()
        higher = (other > own) | (other_nan & ~own_nan)
        tied = (other == own) | (other_nan & own_nan)
        above = higher | (tied & (order[None, :] < order[:, None]))
        return above.sum(dim=-1) < k
    picked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, picked, True)


def fp32_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b ([..., m, k] @ [..., k, n], the same leading dimensions) summed in fp32 from exact products, as
    attention kernels compute their scores. bf16 or fp16 operands on a GPU go to tensor cores, which multiply them
    exactly and accumulate in fp32 (bmm's out_dtype): cast to fp32 first, they ran on a SIMT kernel, 11 us of each
    TransPrune stage on an H100. Elsewhere they are cast."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        lead = a.shape[:-2]
        product = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return product.view(*lead, *product.shape[-2:])
    return a.float() @ b.float()


def ascending(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Distinct indices into `n` positions, in ascending order ([k] or [B, k]): marked in a mask and read back in
    order. On a GPU that is a few fused kernels, where sorting them was one slow one (20 us for 448 indices on an
    H100, scripts/profile_prefill.py)."""
    mask = torch.zeros(*indices.shape[:-1], n, dtype=torch.bool, device=indices.device).scatter_(-1, indices, True)
    return true_indices(mask, indices.shape[-1])


def stages_that_prune(stages: Sequence[Stage], num_visual: int) -> tuple[Stage, ...]:
    """The stages that drop tokens, in order: one keeping every token that enters it would still score and
    select, for nothing (a schedule's early stages do at large budgets)."""
    kept, entering = [], num_visual
    for stage in stages:
        if stage.keep < entering:
            kept.append(stage)
            entering = stage.keep
    return tuple(kept)


def one_size(contexts: Sequence[ScoreContext]) -> bool:
    """Whether the images of a stage hold as many tokens and keep as many: their work can be stacked."""
    return bool(contexts) and len({(ctx.tokens.shape[0], ctx.stage.keep) for ctx in contexts}) == 1


def true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first `count` True entries of a mask, ascending, along its last dimension ([n] -> [count],
    [B, n] -> [B, count]). Unlike `mask.nonzero()` it never waits for the GPU to learn the count, so a
    selection using it can be captured in a CUDA graph. Where fewer are True, False entries follow, ascending.
    Each slot is found by counting, not sorting: the k-th True is where the running count of Trues first reaches
    k + 1, and so on for the Falses after them. (Placing every entry in its slot instead took a scatter kernel
    each time, 3 us on an H100.)"""
    n = mask.shape[-1]
    positions = torch.arange(n, device=mask.device)
    wanted = torch.arange(1, count + 1, device=mask.device).expand(*mask.shape[:-1], count).contiguous()
    if torch.compiler.is_compiling() and n <= PAIRWISE_LIMIT:
        # Counts as sums over pairs, which inductor fuses into parallel reductions. A scan (cumsum) it may split
        # across programs, and fused with a reduction after it, it failed that: "NYI TritonSplitDimKernel
        # reductions" (LearnPruner's greedy picks at batch 8 on an H100).
        trues_so_far = (mask[..., None, :] & (positions <= positions[:, None])).sum(-1)

        def first_reaching(counts: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return (counts[..., None, :] < targets[..., :, None]).sum(-1)
    else:
        trues_so_far = mask.long().cumsum(-1)
        first_reaching = torch.searchsorted  # a binary search of the non-decreasing counts
    falses_so_far = positions + 1 - trues_so_far
    total = trues_so_far[..., -1:]
    at_true = first_reaching(trues_so_far, wanted)
    at_false = first_reaching(falses_so_far, wanted - total)
    return torch.where(wanted <= total, at_true, at_false)


#: Observations of the vision tower, before the LLM (docs/plugins.md, "Observations").
VISION_OBSERVATIONS = frozenset(
    {"vision_attention", "vision_keys", "vision_features", "vision_project", "vision_cls_features"}
)
#: Observations at an in-LLM stage.
LLM_OBSERVATIONS = frozenset(
    {"last_token_attention", "received_attention", "instruction_attention", "next_layer_instruction_attention",
     "sublayer_summary"}
)
#: Every name a strategy may list in `observes`.
OBSERVATIONS = VISION_OBSERVATIONS | LLM_OBSERVATIONS


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


def build_params(strategy: str, params_class: type[StrategyParams], values: Mapping[str, Any]):
    """Validate user-given parameter values (already typed, or strings from the CLI) into `params_class`."""
    known = [f.name for f in dataclasses.fields(params_class)]
    for key in values:
        if key not in known:
            suggestion = closest(key, known)
            hint = f"; did you mean {suggestion!r}?" if suggestion else ";"
            raise InvalidParameterError(
                f"strategy {strategy!r} has no parameter {key!r}{hint} its parameters: {', '.join(known)}"
            )
    # From the CLI a list comes as text, e.g. --param transprune.prune_layers=[7,9,12].
    values = {k: parse_yaml(v, f"parameter {strategy}.{k}") if isinstance(v, str) and v.strip().startswith("[") else v
              for k, v in values.items()}
    schema = param_schema(params_class)
    for key, value in values.items():  # pydantic's lax mode would take YAML's `true` as the number 1
        if isinstance(value, bool) and "boolean" not in str(schema.get(key)):
            raise InvalidParameterError(f"invalid value {value!r} for parameter {strategy}.{key}: a boolean is not "
                                        f"a number; allowed: {describe_field(params_class, key)}")
    try:
        return params_class(**values)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        if not first["loc"]:  # a rule across fields (a validator of the whole dataclass)
            raise InvalidParameterError(f"invalid parameters for strategy {strategy}: "
                                        f"{first['msg'].removeprefix('Value error, ')}") from None
        field = str(first["loc"][0])
        raise InvalidParameterError(
            f"invalid value {shown(first.get('input'))} for parameter {strategy}.{field}: {first['msg']}; "
            f"allowed: {describe_field(params_class, field)}"
        ) from None


def param_schema(params_class: type[StrategyParams]) -> dict[str, dict[str, Any]]:
    """JSON schema of each parameter (type, bounds, choices, default, description), by name."""
    return pydantic.TypeAdapter(params_class).json_schema()["properties"]


def params_as_dict(params: StrategyParams) -> dict[str, Any]:
    """Every parameter of a strategy (defaults included), JSON-ready: what a result records."""
    return pydantic.TypeAdapter(type(params)).dump_python(params, mode="json")


def describe_field(params_class: type[StrategyParams], field: str, default: bool = True) -> str:
    """A short phrase for what a parameter accepts, e.g. 'integer >= 1 (default 2)'."""
    schema = param_schema(params_class).get(field, {})
    if "enum" in schema:
        text = "one of " + ", ".join(repr(v) for v in schema["enum"])
    elif "const" in schema:
        text = repr(schema["const"])
    elif "anyOf" in schema:
        text = " or ".join(_describe_type(option) for option in schema["anyOf"])
    else:
        text = _describe_type(schema)
    if default and "default" in schema:
        text += f" (default {schema['default']!r})"
    return text


def _describe_type(schema: Mapping[str, Any]) -> str:
    text = schema.get("type", "value")
    bounds = [
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ]
    for key, symbol in bounds:
        if key in schema:
            text += f" {symbol} {schema[key]}"
    if "enum" in schema:
        text = "one of " + ", ".join(repr(v) for v in schema["enum"])
    return text
