"""The pruning engine: apply a strategy to an unmodified transformers VLM for the span of a `with` block.

    with prune(model, get_strategy("fastv"), budget=64) as run:
        output = model.generate(**inputs)
    run.records[-1].images[0].average_per_layer

Hooks, all registered on entry and removed on exit:
- on the VLM's base model: read `input_ids` to locate each image's placeholder tokens;
- on the language model (before layer 0): the pre-LLM stage shrinks `inputs_embeds`, the attention mask and
  the position ids, so the model builds its own causal mask and rotary tables for the short sequence; at
  decode it translates generate's full-length mask and positions to the pruned cache;
- on every decoder layer: after a stage at layer k, layer k+1 drops tokens from the hidden states and every
  later layer gets the matching rows and columns of the mask, rotary tables and position ids (the model
  computes those once per forward for the full sequence). Layers 0..k keep their full KV cache and
  layers > k a pruned one, so generate() with the cache decodes exactly what the pruned sequence gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pruning_zoo.engine.adapters import ModelAdapter, adapter_for
from pruning_zoo.engine.adapters.base import VISION_OBSERVATIONS
from pruning_zoo.engine.checks import check_plan, check_selections
from pruning_zoo.engine.flops import DecoderShape
from pruning_zoo.engine.observe import AttentionProbe, sublayer_hooks
from pruning_zoo.engine.records import ForwardRecord, ImageRecord
from pruning_zoo.engine.sequence import Survivors, causal_mask, gather_positions, mask_invalid_keys
from pruning_zoo.engine.timing import Clock
from pruning_zoo.engine.vision_stages import VisionStages
from pruning_zoo.errors import PruningZooError
from pruning_zoo.strategy import PruningStrategy, ScoreContext, Selection, Stage, SublayerIO, plan_stages
from pruning_zoo.strategy.budget import Budget, check_budget, resolve_budget


@contextlib.contextmanager
def prune(model: nn.Module, strategy: PruningStrategy, budget: Budget, clock: Clock | None = None,
          sample_keys: list[str] | None = None) -> Iterator[PruningRun]:
    """Prune `model`'s visual tokens with `strategy` at `budget` for the span of the block. With a `clock`, the
    engine's own pruning work (scoring, selecting, gathering the survivors) is timed as spans "selection".
    `sample_keys` names each sample of the batch (e.g. its document); its images get `image_key`s from them."""
    run = PruningRun(adapter_for(model), strategy, budget, clock, sample_keys)
    handles = run.attach()
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass
class _Image:
    sample: int
    num_visual: int
    #: Positions of this image's visual tokens in the current sequence.
    positions: torch.Tensor
    stages: tuple[Stage, ...]
    kept_per_layer: list[int]
    grid: tuple[int, int] | None
    vision_flops: int
    #: Original indices of the surviving slots, None where a slot holds no patch (shared with the record, updated
    #: in place).
    kept: list[int | None] = dataclasses.field(default_factory=list)
    key: str | None = None
    #: Merge units of this image entering each vision block, where a stage inside the tower merged (else empty).
    vision_units: list[int] = dataclasses.field(default_factory=list)


class PruningRun:
    """The state of one `prune` block: hooks, the current forward's images, and the records."""

    def __init__(self, adapter: ModelAdapter, strategy: PruningStrategy, budget: Budget, clock: Clock | None = None,
                 sample_keys: list[str] | None = None):
        check_budget(budget)
        self.adapter, self.strategy, self.budget = adapter, strategy, budget
        self.clock = clock
        self.sample_keys = sample_keys
        self.records: list[ForwardRecord] = []
        self._input_ids: torch.Tensor | None = None
        self._prefilling = False
        #: Position ids entering the language model at the current decode step.
        self._decode_positions: torch.Tensor | None = None
        #: The strategy's stages inside the vision tower, applied by the adapter's hooks (docs/engine.md).
        self._tower = VisionStages(strategy, budget, adapter.num_layers, adapter.vision_stage_depth, adapter.identity)
        self._reset()

    def _reset(self) -> None:
        self._images: list[_Image] = []
        #: The pre-LLM prune, in input_ids coordinates (used to translate decode steps).
        self._entry: Survivors | None = None
        #: After an in-LLM prune: the first layer it applies to -> survivors in language-model coordinates.
        self._layer_survivors: dict[int, Survivors] = {}
        self._stage_layers: set[int] = set()
        self._captured: dict[int, tuple[torch.Tensor, dict]] = {}
        self._current: Survivors | None = None
        self._current_kwargs: dict | None = None
        self._attention_mask_2d: torch.Tensor | None = None
        #: Per watched layer: its attention and MLP sub-block inputs and outputs until summarized, the
        #: strategy's summary [B, L_layer] after, and the survivors it ran on.
        self._sublayers: dict[int, dict[str, torch.Tensor]] = {}
        self._summaries: dict[int, torch.Tensor] = {}
        self._survivors_at: dict[int, Survivors | None] = {}
        #: Position ids of the current sequence ([B, L], or [axes, B, L] for multi-axis positions).
        self._positions: torch.Tensor | None = None
        #: From a layer on: the position ids of its sequence at prefill (set where an in-LLM stage applies).
        self._positions_from_layer: dict[int, torch.Tensor] = {}
        #: [B] how far renumbering moved positions after the prompt: before the LLM, and from each layer on.
        self._entry_shift: torch.Tensor | None = None
        self._shift_from_layer: dict[int, torch.Tensor] = {}

    # -- hooks -----------------------------------------------------------------------------------------
    def attach(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = [self.adapter.model.model.register_forward_pre_hook(self._read_input_ids, with_kwargs=True)]
        if self.strategy.plans_vision:  # before the observing hooks, which then see the merged tower
            handles += self.adapter.vision_stage_hooks(self._tower)
        handles += self.adapter.vision_hooks(self.strategy.observes)
        handles.append(
            self.adapter.language_model.register_forward_pre_hook(self._enter_language_model, with_kwargs=True)
        )
        watched = set(self.strategy.sublayer_layers(self.adapter.num_layers)) if "sublayer_summary" in self.strategy.observes else set()
        for index, layer in enumerate(self.adapter.layers):
            handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            if index in watched:
                handles += self._sublayer_hooks(index, layer)
        return handles

    def _sublayer_hooks(self, index: int, layer: nn.Module) -> list:
        def store(part: str, tensor: torch.Tensor) -> None:
            if self._prefilling:
                self._sublayers.setdefault(index, {})[part] = tensor

        return sublayer_hooks(layer, store)

    def _read_input_ids(self, module, args, kwargs):
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.adapter.read_inputs(kwargs)

    def _enter_language_model(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        ids = self._input_ids
        cache = kwargs.get("past_key_values")
        cache_is_empty = cache is None or cache.get_seq_length() == 0
        if embeds is None or ids is None or ids.shape[1] != embeds.shape[1]:
            ids = None
        self._prefilling = cache_is_empty
        if cache_is_empty:
            self._reset()
            if ids is None or not bool((ids == self.adapter.image_token_id).any()):
                return None
            return args, self._prefill(ids, kwargs)
        if self._entry is not None:
            kwargs = self._translate_decode_inputs(kwargs)
        self._decode_positions = kwargs.get("position_ids")
        return args, kwargs

    def _layer_hook(self, index: int) -> Callable:
        def hook(module, args, kwargs):
            if self._prefilling and index - 1 in self._stage_layers:
                with self._timed("selection"):
                    args = (self._prune_in_llm(index, args[0], kwargs), *args[1:])
            kwargs = self._layer_kwargs(index, args[0], kwargs)
            if self._prefilling:
                self._survivors_at[index] = self._current
            if self._prefilling and index in self._stage_layers:
                self._captured[index] = (args[0], kwargs)
            return args, kwargs

        return hook

    def _timed(self, name: str):
        return contextlib.nullcontext() if self.clock is None else self.clock.span(name)

    # -- prefill -----------------------------------------------------------------------------------------
    def _prefill(self, input_ids: torch.Tensor, kwargs: dict) -> dict:
        num_layers = self.adapter.num_layers
        positions = self.adapter.image_positions(input_ids)
        counts = [int(p.numel()) for sample in positions for p in sample]
        grids = iter(self.adapter.image_grids(counts))
        if self.sample_keys is not None and len(self.sample_keys) != len(positions):
            raise PruningZooError(f"{len(self.sample_keys)} sample keys for a batch of {len(positions)} samples")
        for sample, sample_positions in enumerate(positions):
            for order, image_positions in enumerate(sample_positions):
                num_visual = int(image_positions.numel())
                depth = self.adapter.vision_stage_depth
                stages = plan_stages(self.strategy, resolve_budget(self.budget, num_visual), num_visual, num_layers, depth)
                check_plan(self.strategy.name, stages, num_visual, num_layers, vision_blocks=depth)
                vision_flops = self.adapter.vision_flops(len(self._images), num_visual)
                key = None if self.sample_keys is None else f"{self.sample_keys[sample]}#image{order}"
                self._images.append(
                    _Image(sample, num_visual, image_positions, stages, [num_visual] * num_layers, next(grids), vision_flops,
                           list(range(num_visual)), key)
                )
        self._stage_layers = {s.after_layer for image in self._images for s in image.stages if s.in_llm}
        self._attention_mask_2d = kwargs.get("attention_mask")

        if any(not s.in_llm for image in self._images for s in image.stages):  # before the LLM or in the tower
            with self._timed("selection"):
                kwargs = self._prune_before_llm(input_ids, kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(kwargs["inputs_embeds"].shape[1], device=input_ids.device)[None]
        self._positions = positions
        self._record_tokens_entering()
        return kwargs

    def _select_images(self, pending: list[tuple[_Image, Stage, dict]], sequence: torch.Tensor) -> list[Selection]:
        """The strategy's selections for the images at one stage, (image, stage, observations) each, whose
        tokens are rows of `sequence` [B, L, d]: one call for them all, each selection checked."""
        if not pending:  # e.g. before the LLM where every image's tokens were merged in the tower
            return []
        contexts = [
            ScoreContext(stage=stage, tokens=sequence[image.sample, image.positions], num_layers=self.adapter.num_layers,
                         grid=image.grid if not stage.in_llm else None, observations=observations,
                         model=self.adapter.identity, image_key=image.key)
            for image, stage, observations in pending
        ]
        selections = self.strategy.select_images(contexts)
        check_selections(self.strategy.name, selections, contexts)
        return selections

    def _apply_stage(
        self, image: _Image, stage: Stage, selection: Selection, sequence: torch.Tensor, keep: torch.Tensor, first_layer: int
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Apply one image's selection at a stage: write merged features into `sequence` [B, L, d] in place, clear
        the dropped positions in `keep` [B, L], and count the survivors from decoder layer `first_layer` on.
        Returns (sample, positions before, positions kept), in the stage's coordinates."""
        kept_index = selection.keep.to(image.positions.device)
        kept = image.positions[kept_index]
        if selection.features is not None:
            sequence[image.sample, kept] = selection.features.to(sequence.dtype)
        dropped = torch.ones_like(image.positions, dtype=torch.bool)
        dropped[kept_index] = False
        keep[image.sample, image.positions[dropped]] = False
        before, image.positions = image.positions, kept
        image.kept_per_layer[first_layer:] = [stage.keep] * (self.adapter.num_layers - first_layer)
        borrowed = selection.borrowed.tolist() if selection.borrowed is not None else [False] * stage.keep
        image.kept[:] = [None if lent else image.kept[i] for i, lent in zip(selection.keep.tolist(), borrowed)]
        return image.sample, before, kept

    def _prune_before_llm(self, input_ids: torch.Tensor, kwargs: dict) -> dict:
        embeds = kwargs["inputs_embeds"].clone()
        keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        pending, grouped = [], []
        shared = {}  # what the images' observations derive from the tower's forward, computed once
        for image_index, image in enumerate(self._images):
            stage = next((s for s in image.stages if s.before_llm), None)
            merged = [s for s in image.stages if s.in_vision]
            if merged:  # the engine's own stage: one token per merge group
                image.vision_units = self._tower_units(image_index, image)
                grouped.append((image, Stage(None, keep=merged[-1].keep), self._tower.entry_selection(image_index)))
            if stage is not None:
                observed = self.strategy.observes & VISION_OBSERVATIONS  # built only when asked for
                observations = self.adapter.vision_observations(image_index, image.num_visual, shared) if observed else {}
                if "instruction_embeddings" in self.strategy.observes:
                    observations = {**observations, "instruction_embeddings": functools.partial(
                        self._instruction_embeddings, input_ids, embeds, image)}
                pending.append((image, stage, observations))
        selections = self._select_images(pending, embeds)
        changes = [self._apply_stage(image, stage, selection, embeds, keep, first_layer=0)
                   for (image, stage, _), selection in zip(pending, selections)]
        changes += [self._apply_stage(image, stage, selection, embeds, keep, first_layer=0)
                    for image, stage, selection in grouped]
        survivors = Survivors.from_keep_mask(keep)
        self._entry = survivors
        positions = kwargs.get("position_ids")
        if positions is None:  # the model would count 0..L-1; make that explicit before dropping
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        positions, self._entry_shift = self._positions_after(positions, survivors, changes)
        self._relocate_images(survivors)

        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = survivors.gather(embeds, dim=1)
        mask = kwargs.get("attention_mask")
        if mask is None and survivors.has_fillers:
            mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        if mask is not None:
            kwargs["attention_mask"] = survivors.gather(mask, dim=1) * survivors.valid.to(mask.dtype)
        kwargs["position_ids"] = positions
        return kwargs

    def _tower_units(self, image_index: int, image: _Image) -> list[int]:
        """The merge units an image's vision blocks ran on; the tower must have run under this block's hooks."""
        tower = self._tower.images
        if image_index >= len(tower) or tower[image_index].units != image.num_visual:
            raise PruningZooError(
                f"strategy {self.strategy.name!r} merges inside the vision tower, but the tower did not run on this "
                f"image ({image.num_visual} visual tokens) inside the `prune` block; run the model's forward or "
                "generate() with its pixel inputs inside it")
        return self._tower.units_per_block(image_index, len(self.adapter.vision_blocks))

    def _instruction_embeddings(self, input_ids: torch.Tensor, embeds: torch.Tensor, image: _Image) -> torch.Tensor:
        """The `instruction_embeddings` observation: the input embeddings [t, d] of the tokens after the image to
        the prompt's end, leaving out image tokens (of later images) and padding."""
        sample = image.sample
        text = torch.arange(input_ids.shape[1], device=input_ids.device) > image.positions[-1]
        text &= input_ids[sample] != self.adapter.image_token_id
        if self._attention_mask_2d is not None:
            text &= self._attention_mask_2d[sample].bool()
        return embeds[sample, text]

    def _positions_after(self, positions: torch.Tensor, step: Survivors, changes: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the survivors of `step` (kept, or renumbered by the adapter's rule) and, per sample,
        how far renumbering moved the positions after the prompt (zero when positions are kept)."""
        return positions_after(self.adapter, self.strategy.params.positions, positions, step, changes)

    def _relocate_images(self, survivors: Survivors) -> None:
        """Re-express image positions in the coordinates of the pruned sequence."""
        index = survivors.index
        lookup = torch.full((index.shape[0], survivors.source_length), -1, dtype=torch.long, device=index.device)
        lookup.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))
        for image in self._images:
            image.positions = lookup[image.sample, image.positions]

    def _prune_in_llm(self, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Drop visual tokens after layer index-1 from the hidden states entering layer `index`."""
        stage_layer = index - 1
        probe = AttentionProbe(
            adapter=self.adapter,
            stage_layer=stage_layer,
            stage_input=self._captured.pop(stage_layer),
            stage_output=hidden,
            next_layer_kwargs=self._layer_kwargs(index, hidden, kwargs),
            key_valid=self._current_valid(),
        )
        self._summarize_sublayers(stage_layer)
        hidden = hidden.clone()
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        pending = []
        for image in self._images:
            stage = next((s for s in image.stages if s.after_layer == stage_layer), None)
            if stage is not None:
                observations = probe.observations(image.sample, image.positions)
                observations["sublayer_summary"] = functools.partial(self._sublayer_summary, image.sample, image.positions, stage)
                pending.append((image, stage, observations))
        selections = self._select_images(pending, hidden)
        changes = [self._apply_stage(image, stage, selection, hidden, keep, first_layer=index)
                   for (image, stage, _), selection in zip(pending, selections)]
        step = Survivors.from_keep_mask(keep)
        self._positions, shift = self._positions_after(self._positions, step, changes)
        self._positions_from_layer[index] = self._positions
        previous = [self._shift_from_layer[layer] for layer in self._shift_from_layer if layer < index]
        self._shift_from_layer[index] = shift + (previous[-1] if previous else 0)
        self._relocate_images(step)
        self._current = step if self._current is None else self._current.then(step)
        self._current_kwargs = None
        self._layer_survivors[index] = self._current
        self._record_layer_tokens(index)
        return step.gather(hidden, dim=1)

    def _summarize_sublayers(self, up_to: int) -> None:
        """The strategy's summary of every watched layer up to `up_to` not yet summarized, for the whole batch
        at once; the layer's sub-block tensors are let go."""
        for layer in sorted(index for index in self._sublayers if index <= up_to):
            parts = self._sublayers.pop(layer)
            if len(parts) < 4:
                raise PruningZooError(f"the sub-blocks of layer {layer} did not all run (got {sorted(parts)})")
            valid = self._valid_at_entry()
            survivors = self._survivors_at[layer]
            if survivors is not None:
                valid = valid.gather(1, survivors.index) & survivors.valid
            summary = self.strategy.summarize_sublayers(SublayerIO(**parts, valid=valid))
            if summary.shape != valid.shape:
                raise PruningZooError(f"strategy {self.strategy.name!r} summarized layer {layer} as shape "
                                      f"{tuple(summary.shape)}; expected one value per position, {tuple(valid.shape)}")
            self._summaries[layer] = summary

    def _sublayer_summary(self, sample: int, positions: torch.Tensor, stage: Stage, layer: int) -> torch.Tensor:
        """sublayer_summary(layer): the strategy's summary of an earlier watched layer at this image's current
        tokens, [n] (the tokens' rows in that layer's sequence found through the survivors it ran on)."""
        if layer not in self._summaries:
            raise PruningZooError(
                f"no sub-block summary of layer {layer} {stage}: a layer is summarized when the strategy's "
                f"sublayer_layers lists it and it ran before the stage (layers 0..{stage.after_layer} ran)"
            )
        entry_rows = positions if self._current is None else self._current.index[sample, positions]
        survivors = self._survivors_at[layer]
        rows = entry_rows if survivors is None else torch.searchsorted(survivors.index[sample], entry_rows)
        return self._summaries[layer][sample, rows]

    def _valid_at_entry(self) -> torch.Tensor:
        """[B, L] which positions entering the language model are real tokens (not padding, not fillers)."""
        mask = self._attention_mask_2d
        if self._entry is not None:
            valid = self._entry.valid
            return valid if mask is None else self._entry.gather(mask, dim=1).bool() & valid
        if mask is not None:
            return mask.bool()
        return torch.ones(self._input_ids.shape, dtype=torch.bool, device=self._input_ids.device)

    def _current_valid(self) -> torch.Tensor:
        """[B, L] which positions of the current sequence are real tokens."""
        valid = self._valid_at_entry()
        if self._current is not None:
            valid = valid.gather(1, self._current.index) & self._current.valid
        return valid

    # -- per-layer inputs -------------------------------------------------------------------------------
    def _layer_kwargs(self, index: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        survivors = self._survivors_for_layer(index)
        if survivors is None:
            return kwargs
        if self._prefilling:
            if self._current_kwargs is None:
                self._current_kwargs = self._prefill_layer_kwargs(index, survivors, hidden, kwargs)
            return {**kwargs, **self._current_kwargs}
        return {**kwargs, **self._decode_layer_kwargs(index, survivors, hidden, kwargs)}

    def _survivors_for_layer(self, index: int) -> Survivors | None:
        first = self._stage_start(index)
        return None if first is None else self._layer_survivors[first]

    def _stage_start(self, index: int) -> int | None:
        """The first layer of the in-LLM stage whose sequence layer `index` runs on (None: the entry's)."""
        starts = [layer for layer in self._layer_survivors if layer <= index]
        return max(starts) if starts else None

    def _prefill_layer_kwargs(self, index: int, survivors: Survivors, hidden: torch.Tensor, kwargs: dict) -> dict:
        result = {}
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = mask_invalid_keys(survivors.gather(survivors.gather(mask, dim=2), dim=3), survivors.valid)
        elif survivors.has_fillers:
            mask = causal_mask(survivors.index, survivors.index, survivors.valid, self._mask_dtype(hidden))
        result["attention_mask"] = mask
        positions = self._positions_from_layer[self._stage_start(index)]
        if kwargs.get("position_ids") is not None:
            result["position_ids"] = self.adapter.layer_position_ids(positions)
        if self.strategy.params.positions == "renumber":
            result["position_embeddings"] = self.adapter.rotary_embedding(hidden, positions)
        else:  # the model's own tables for the kept positions, bit for bit
            cos, sin = kwargs["position_embeddings"]
            result["position_embeddings"] = (survivors.gather(cos, dim=-2), survivors.gather(sin, dim=-2))
        return result

    def _decode_layer_kwargs(self, index: int, survivors: Survivors, hidden: torch.Tensor, kwargs: dict) -> dict:
        result = {}
        mask = kwargs.get("attention_mask")
        # Layer 0 (never pruned inside the LLM) has already cached this step: it holds the whole key axis.
        total = mask.shape[-1] if mask is not None else kwargs["past_key_values"].get_seq_length(0)
        columns, valid = survivors.columns_with_new(total)
        if mask is not None:
            result["attention_mask"] = mask_invalid_keys(gather_positions(mask, columns, dim=3), valid)
        elif survivors.has_fillers:
            queries = torch.arange(total - hidden.shape[1], total, device=hidden.device).expand(columns.shape[0], -1)
            result["attention_mask"] = causal_mask(queries, columns, valid, self._mask_dtype(hidden))
        if self.strategy.params.positions == "renumber":
            if self._decode_positions is None:
                raise PruningZooError(
                    "renumbered positions need explicit position_ids when decoding; generate() passes them, "
                    "a hand-written decoding loop must too"
                )
            positions = self._decode_positions - self._shift_from_layer[self._stage_start(index)][:, None]
            result["position_embeddings"] = self.adapter.rotary_embedding(hidden, positions)
            if kwargs.get("position_ids") is not None:
                result["position_ids"] = self.adapter.layer_position_ids(positions)
        return result

    def _mask_dtype(self, hidden: torch.Tensor):
        return hidden.dtype if self.adapter.attention_implementation() == "eager" else torch.bool

    # -- decode at the language-model entry ---------------------------------------------------------------
    def _translate_decode_inputs(self, kwargs: dict) -> dict:
        """Map generate's full-length mask and positions onto the cache pruned before the LLM."""
        survivors = self._entry
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        new_tokens = kwargs["inputs_embeds"].shape[1]
        if mask is not None:
            columns, valid = survivors.columns_with_new(mask.shape[1])
            kwargs["attention_mask"] = gather_positions(mask, columns, dim=1) * valid.to(mask.dtype)
        elif survivors.has_fillers:
            cached = kwargs["past_key_values"].get_seq_length(0)
            total = survivors.source_length + (cached - survivors.index.shape[1]) + new_tokens
            columns, valid = survivors.columns_with_new(total)
            kwargs["attention_mask"] = valid.long()
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and self.strategy.params.positions == "renumber":
            kwargs["position_ids"] = position_ids - self._entry_shift[:, None]
        return kwargs

    # -- records -----------------------------------------------------------------------------------------
    def _record_tokens_entering(self) -> None:
        layers = self.adapter.num_layers
        counts = self._valid_at_entry().sum(dim=1).tolist()
        self.records.append(
            ForwardRecord(
                # kept_per_layer is shared with the image, so later in-LLM stages update the record.
                images=[
                    ImageRecord(image.sample, image.num_visual, image.kept_per_layer, image.vision_flops, image.kept,
                                image.vision_units)
                    for image in self._images
                ],
                tokens_per_layer=[[int(count)] * layers for count in counts],
                decoder=DecoderShape.from_config(self.adapter.text_config),
            )
        )

    def _record_layer_tokens(self, index: int) -> None:
        counts = self._current_valid().sum(dim=1).tolist()
        for sample, count in enumerate(counts):
            self.records[-1].tokens_per_layer[sample][index:] = [int(count)] * (self.adapter.num_layers - index)

def positions_after(adapter: ModelAdapter, mode: str, positions: torch.Tensor, step: Survivors, changes: list):
    """Position ids of the survivors of `step`, kept (`mode` 'keep') or renumbered by the family's rule, and per
    sample how far renumbering moved the positions after the prompt (zero when positions are kept)."""
    gathered = gather_axes(positions, step)
    if mode == "keep":
        return gathered, torch.zeros(step.index.shape[0], dtype=torch.long, device=step.index.device)
    shift, total = adapter.renumber_shift(positions, step, changes)
    return gathered - shift, total


def gather_axes(positions: torch.Tensor, survivors: Survivors) -> torch.Tensor:
    """Survivors of position ids [B, L] or multi-axis [axes, B, L] (M-RoPE)."""
    if positions.dim() == 2:
        return survivors.gather(positions, dim=-1)
    return torch.stack([survivors.gather(axis, dim=-1) for axis in positions])
