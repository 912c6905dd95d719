"""What the engine refuses from a strategy, with a message naming it: a plan out of range, scores or kept indices
of the wrong shape, out of bounds or repeated. The eager engine and the compiled benchmark check the same way."""

from __future__ import annotations

import torch

from pruning_zoo.errors import InvalidParameterError, PruningZooError, StrategyOutputError
from pruning_zoo.strategy import ScoreContext, Selection, Stage

__all__ = ["check_indices", "check_merge", "check_plan", "check_selection", "check_selections"]


def check_plan(name: str, stages: tuple[Stage, ...], num_visual: int, num_layers: int,
               vision_blocks: int | None = None) -> None:
    """A plan is stages in forward order, each keeping between 1 and the tokens left, inside the model. Stages
    inside the vision tower come first, after blocks 0..vision_blocks-2 (a merge after the last block the model
    reads makes nothing cheaper), and leave the stage before the LLM to the engine (one token per merge group)."""
    left, last = num_visual, -2 - (vision_blocks or 0)
    in_vision = [stage for stage in stages if stage.in_vision]
    if in_vision and vision_blocks is None:
        raise InvalidParameterError(f"strategy {name!r} plans stages inside the vision tower ({in_vision[0]}), but "
                                    "this model family has no stage inside its vision tower")
    if in_vision and any(stage.before_llm for stage in stages):
        raise InvalidParameterError(f"strategy {name!r} plans a stage before the LLM after stages inside the vision "
                                    "tower: the engine's own stage there keeps one token per merge group")
    for stage in stages:
        if stage.in_vision:
            if stage.after_layer is not None or not 0 <= stage.vision_block <= vision_blocks - 2:
                raise InvalidParameterError(
                    f"strategy {name!r} plans a stage after vision block {stage.vision_block}, outside this model's "
                    f"blocks 0..{vision_blocks - 2} (the model reads {vision_blocks} blocks; a merge after the last "
                    "of them makes none cheaper)"
                )
            layer = stage.vision_block - 1 - vision_blocks
        else:
            layer = -1 if stage.after_layer is None else stage.after_layer
        if stage.after_layer is not None and not 0 <= stage.after_layer <= num_layers - 2:
            raise InvalidParameterError(
                f"strategy {name!r} plans a stage after layer {stage.after_layer}, outside this model's decoder "
                f"layers 0..{num_layers - 2} (a stage after the last of its {num_layers} layers prunes nothing)"
            )
        if layer <= last:
            raise PruningZooError(f"strategy {name!r} planned stages out of forward order: {stages}")
        if not 1 <= stage.keep <= left:
            raise InvalidParameterError(
                f"strategy {name!r} plans to keep {stage.keep} tokens {stage}, but between 1 and {left} are left"
            )
        left, last = stage.keep, layer


def check_selection(name: str, selection: Selection, stage: Stage, tokens: torch.Tensor) -> None:
    keep = selection.keep
    if keep.shape != (stage.keep,):
        raise StrategyOutputError(
            f"strategy {name!r} selected {tuple(keep.shape)} tokens {stage}; expected exactly {stage.keep}"
        )
    check_indices(name, keep, stage, tokens.shape[0])
    if stage.in_vision:
        check_merge(name, selection, stage, tokens.shape[0])
    elif selection.into is not None:
        raise StrategyOutputError(f"strategy {name!r} gave merge targets (`into`) {stage}; only a stage inside the "
                                  "vision tower merges through them")
    if selection.features is not None and selection.features.shape != (stage.keep, tokens.shape[1]):
        raise StrategyOutputError(
            f"strategy {name!r} merged features of shape {tuple(selection.features.shape)} {stage}; "
            f"expected ({stage.keep}, {tokens.shape[1]})"
        )
    borrowed = selection.borrowed
    if borrowed is not None and (borrowed.shape != (stage.keep,) or borrowed.dtype != torch.bool):
        raise StrategyOutputError(f"strategy {name!r} marked borrowed slots as {borrowed.dtype} {tuple(borrowed.shape)} "
                                  f"{stage}; expected a bool tensor of shape ({stage.keep},)")


def check_merge(name: str, selection: Selection, stage: Stage, count: int) -> None:
    """At a stage inside the vision tower: no replacement features, and `into` [count] naming a kept token for
    every token, each kept token its own (read on the host)."""
    into = selection.into
    if selection.features is not None or into is None or into.shape != (count,) or into.dtype != torch.int64:
        raise StrategyOutputError(
            f"strategy {name!r} must merge {stage} through `into`, an int64 tensor of shape ({count},) naming the kept "
            f"token each token joins, and no `features`; got into={None if into is None else (into.dtype, tuple(into.shape))}"
        )
    if int(into.min()) < 0 or int(into.max()) >= stage.keep:
        raise StrategyOutputError(f"strategy {name!r} merges into tokens outside 0..{stage.keep - 1} {stage}")
    own = into[selection.keep.to(into.device)]
    if not torch.equal(own, torch.arange(stage.keep, device=into.device)):
        raise StrategyOutputError(f"strategy {name!r} merges a kept token into another {stage}; a kept token's `into` "
                                  "is its own place in `keep`")


def check_indices(name: str, keep: torch.Tensor, stage: Stage, count: int) -> None:
    """Kept indices [k] into `count` tokens must be ascending, unique and in range (read on the host)."""
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= count or bool((keep[1:] <= keep[:-1]).any())):
        outside = int(((keep < 0) | (keep >= count)).sum())
        repeated = keep.numel() - int(keep.unique().numel())
        descents = int((keep[1:] <= keep[:-1]).sum())
        raise StrategyOutputError(
            f"strategy {name!r} selected invalid indices {stage}: they must be ascending, unique and below "
            f"{count} ({outside} outside, {repeated} repeated, {descents} not above the one before)"
        )


def check_selections(name: str, selections: list[Selection], contexts: list[ScoreContext]) -> None:
    if not isinstance(selections, (list, tuple)) or len(selections) != len(contexts):
        raise StrategyOutputError(
            f"strategy {name!r} gave {len(selections) if isinstance(selections, (list, tuple)) else type(selections).__name__} "
            f"selections for {len(contexts)} images; select_images returns one Selection per context, in order"
        )
    for selection, ctx in zip(selections, contexts):
        check_selection(name, selection, ctx.stage, ctx.tokens)
