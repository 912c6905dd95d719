"""Stages inside the vision tower (`Stage(vision_block=j)`): after block j the tower's later blocks run on fewer
rows, one merge unit per group of merged visual tokens.

A merge unit is what becomes one visual token: one patch row of CLIP (its CLS is no unit and never merges), a
2x2 unit of four rows in Qwen2-VL's tower (its PatchMerger concatenates them). At a stage the strategy names the
units it keeps and, for every unit, the kept one it joins (`Selection.into`); this module averages each group's
rows weighted by their sizes (the original units a row holds, ToMe's size-weighted average) and carries the sizes
and the map from original units to groups on. The family's adapter moves the rows: it shrinks the hidden states
entering block j+1 (and their attention segments and rotary tables), and at the tower's exit gives every original
unit its group's features back, so that the model finds one feature per placeholder token. The engine then keeps,
before the LLM, one token per group: the group's kept unit (`origin`).

Everything here runs inside the tower's hooks, without reading a GPU value on the host (the latency benchmark
captures the tower in a CUDA graph); the checks of the strategy's output, which do, run where `validate` is set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from pruning_zoo.engine.checks import check_plan, check_selections
from pruning_zoo.errors import InvalidParameterError
from pruning_zoo.strategy import PruningStrategy, ScoreContext, Selection, Stage, plan_stages
from pruning_zoo.strategy.budget import Budget, resolve_budget


@dataclasses.dataclass
class TowerImage:
    """One image's merge state in the tower's current forward."""

    index: int
    #: Merge units (visual tokens) at the tower's entry.
    units: int
    #: This image's stages inside the tower, in block order.
    stages: tuple[Stage, ...]
    #: [n] the original unit each current unit is (the kept unit of its group), ascending.
    origin: torch.Tensor
    #: [units] the current unit each original unit belongs to.
    group: torch.Tensor
    #: [n] the original units each current unit holds (float32).
    sizes: torch.Tensor
    #: Current units of each attention window of the image, in order (one window: the whole image). Units merge
    #: only within their window (Qwen2.5-VL's windowed blocks), so its attention segments stay known on the host.
    windows: list[int] = dataclasses.field(default_factory=list)
    #: [units] the visual token each unit position of the tower is (Qwen2.5-VL's window order), None: the same.
    token_of: torch.Tensor | None = None

    def units_entering(self, block: int) -> int:
        """Units of this image entering vision block `block`."""
        count = self.units
        for stage in self.stages:
            if stage.vision_block < block:
                count = stage.keep
        return count


class VisionStages:
    """The stages inside the vision tower of one `prune` block (or segmented prefill): planned at the tower's
    entry, applied between its blocks through the adapter's hooks (`adapter.vision_stage_hooks(self)`)."""

    def __init__(self, strategy: PruningStrategy, budget: Budget, num_layers: int, depth: int | None,
                 identity=None):
        self.strategy, self.budget, self.num_layers, self.depth = strategy, budget, num_layers, depth
        self.identity = identity
        self.images: list[TowerImage] = []
        self.across_from: int | None = None
        #: Check the strategy's selections (reads the GPU on the host: never inside a CUDA graph capture).
        self.validate = True

    # -- planning ------------------------------------------------------------------------------------------
    def plan(self, num_visual: int) -> tuple[Stage, ...]:
        """The strategy's whole plan for an image of `num_visual` tokens, checked."""
        stages = plan_stages(self.strategy, resolve_budget(self.budget, num_visual), num_visual, self.num_layers,
                             vision_blocks=self.depth)
        check_plan(self.strategy.name, stages, num_visual, self.num_layers, vision_blocks=self.depth)
        return stages

    def start(self, counts: list[int], device: torch.device, windows: list[list[int]] | None = None,
              token_of: list[torch.Tensor] | None = None, across_from: int | None = None) -> None:
        """A tower forward begins on images of `counts` merge units each; `windows`: each image's units per attention
        window (units merge within their window up to block `across_from`, after which no block attends by window),
        `token_of`: each unit position's visual token (window order)."""
        self.images, self.across_from = [], across_from
        for index, units in enumerate(counts):
            stages = tuple(stage for stage in self.plan(units) if stage.in_vision)
            every = torch.arange(units, device=device)
            image_windows = [units] if windows is None else [count for count in windows[index] if count]
            within = [stage for stage in stages if across_from is None or stage.vision_block < across_from]
            if within and within[-1].keep < len(image_windows):
                raise InvalidParameterError(
                    f"strategy {self.strategy.name!r} merges down to {within[-1].keep} tokens, after vision block "
                    f"{within[-1].vision_block}, an image whose tower still attends within {len(image_windows)} "
                    "windows: units merge within their window there, so at least one token per window remains; raise "
                    "the budget or merge more after the last windowed block")
            self.images.append(TowerImage(index, units, stages, every, every,
                                          torch.ones(units, device=device, dtype=torch.float32), image_windows,
                                          None if token_of is None else token_of[index]))

    @property
    def active(self) -> bool:
        return any(image.stages for image in self.images)

    def blocks_with_stages(self) -> set[int]:
        return {stage.vision_block for image in self.images for stage in image.stages}

    def merged_before(self, block: int) -> bool:
        """Whether some image runs vision block `block` on fewer units than it entered with."""
        return any(stage.vision_block < block for image in self.images for stage in image.stages)

    def stage_at(self, image: TowerImage, block: int) -> Stage | None:
        return next((stage for stage in image.stages if stage.vision_block == block), None)

    # -- merging -------------------------------------------------------------------------------------------
    def merge(self, block: int, units: list[torch.Tensor], keys: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        """Apply the stages after vision block `block`. `units` holds every image's current units [n, r, d] (r rows
        each); `keys(image)` that image's keys at `block` by unit, [n, heads, head_dim]. Returns the units after the
        stage (those of images without a stage there unchanged) and updates each image's origin, groups and sizes."""
        pending = [(image, stage) for image in self.images if (stage := self.stage_at(image, block)) is not None]
        if not pending:
            return units
        contexts, parts = [], []  # a context per window that merges; per image its windows' (start, count, keep, context)
        for image, stage in pending:
            tokens, windows, start = units[image.index].mean(dim=1), [], 0
            if self.across_from is not None and block >= self.across_from:  # no block attends by window any more
                image.windows = [sum(image.windows)]
            for count, keep in zip(image.windows, window_quotas(image.windows, stage.keep)):
                context = None
                if keep < count:
                    rows = slice(start, start + count)
                    observations = {"block_keys": lambda i=image.index, rows=rows: keys(i)[rows],
                                    "unit_sizes": lambda im=image, rows=rows: im.sizes[rows]}
                    window_stage = stage if len(image.windows) == 1 else Stage(None, keep, vision_block=block)
                    context = ScoreContext(stage=window_stage, tokens=tokens[rows], num_layers=self.num_layers,
                                           observations=observations, model=self.identity)
                    contexts.append(context)
                windows.append((start, count, keep, context))
                start += count
            parts.append(windows)
        selections = self.strategy.select_images(contexts)
        if self.validate:
            check_selections(self.strategy.name, selections, contexts)
        chosen = dict(zip(map(id, contexts), selections))
        result = list(units)
        for (image, stage), windows in zip(pending, parts):
            result[image.index] = self._apply(image, stage, self._joined(windows, chosen, units[image.index].device),
                                              units[image.index])
            image.windows = [keep for _, _, keep, _ in windows]
        return result

    @staticmethod
    def _joined(windows: list, chosen: dict, device: torch.device) -> Selection:
        """One image's selection from its windows' (a window that keeps every unit: each its own group)."""
        keep, into, kept = [], [], 0
        for start, count, window_keep, context in windows:
            selection = chosen[id(context)] if context is not None else None
            window_kept = torch.arange(count, device=device) if selection is None else selection.keep.to(device)
            window_into = torch.arange(count, device=device) if selection is None else selection.into.to(device)
            keep.append(window_kept + start)
            into.append(window_into + kept)
            kept += window_keep
        return Selection(keep=torch.cat(keep), into=torch.cat(into))

    @staticmethod
    def _apply(image: TowerImage, stage: Stage, selection: Selection, units: torch.Tensor) -> torch.Tensor:
        """One image's merge: each group's rows averaged, weighted by size (in float32)."""
        into = selection.into.to(units.device)
        sizes = torch.zeros(stage.keep, device=units.device, dtype=torch.float32).index_add_(0, into, image.sizes)
        weighted = (units.float() * image.sizes[:, None, None]).to(torch.float32)
        summed = torch.zeros(stage.keep, *units.shape[1:], device=units.device, dtype=torch.float32).index_add_(0, into, weighted)
        merged = (summed / sizes[:, None, None]).to(units.dtype)
        keep = selection.keep.to(units.device)
        image.origin, image.group, image.sizes = image.origin[keep], into[image.group], sizes
        return merged

    # -- the tower's exit ----------------------------------------------------------------------------------
    def unmerge(self, image: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows [n, ...] of one image's current units back to one per original unit, [units, ...]."""
        return rows[self.images[image].group.to(rows.device)]

    def entry_selection(self, image: int) -> Selection:
        """Before the LLM: the image's tokens kept, one per merge group (the group's kept unit), ascending."""
        tower_image = self.images[image]
        if tower_image.token_of is None:
            return Selection(keep=tower_image.origin)
        return Selection(keep=tower_image.token_of.to(tower_image.origin.device)[tower_image.origin].sort().values)

    def units_per_block(self, image: int, blocks: int) -> list[int]:
        """Merge units of an image entering each of `blocks` vision blocks in the last forward."""
        tower_image = self.images[image]
        return [tower_image.units_entering(block) for block in range(blocks)]


def window_quotas(windows: list[int], keep: int) -> list[int]:
    """Units each window keeps so that `keep` remain in all: the merges shared out in proportion to what each window
    can merge (all but one of its units), largest remainders first (earlier windows on ties). Host arithmetic only."""
    if len(windows) == 1:
        return [keep]
    merges, capacity = sum(windows) - keep, [count - 1 for count in windows]
    total = sum(capacity)
    shares = [merges * c / total if total else 0.0 for c in capacity]
    taken = [int(share) for share in shares]
    for index in sorted(range(len(windows)), key=lambda i: taken[i] - shares[i])[: merges - sum(taken)]:
        taken[index] += 1
    return [count - merged for count, merged in zip(windows, taken)]
