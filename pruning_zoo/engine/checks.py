"""What the engine refuses from a strategy, with a message naming it: a plan out of range, scores or kept indices
of the wrong shape, out of bounds or repeated. The eager engine and the compiled benchmark check the same way."""

from __future__ import annotations

import torch

from pruning_zoo.errors import InvalidParameterError, PruningZooError, StrategyOutputError
from pruning_zoo.strategy import ScoreContext, Selection, Stage

__all__ = ["check_indices", "check_plan", "check_selection", "check_selections"]


def check_plan(name: str, stages: tuple[Stage, ...], num_visual: int, num_layers: int) -> None:
    """A plan is stages in forward order, each keeping between 1 and the tokens left, inside the model."""
    left, last = num_visual, -2
    for stage in stages:
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
    if selection.features is not None and selection.features.shape != (stage.keep, tokens.shape[1]):
        raise StrategyOutputError(
            f"strategy {name!r} merged features of shape {tuple(selection.features.shape)} {stage}; "
            f"expected ({stage.keep}, {tokens.shape[1]})"
        )
    borrowed = selection.borrowed
    if borrowed is not None and (borrowed.shape != (stage.keep,) or borrowed.dtype != torch.bool):
        raise StrategyOutputError(f"strategy {name!r} marked borrowed slots as {borrowed.dtype} {tuple(borrowed.shape)} "
                                  f"{stage}; expected a bool tensor of shape ({stage.keep},)")


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
