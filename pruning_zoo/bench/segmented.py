"""The prefill as a chain of fixed-shape segments between pruning stages, captured in CUDA graphs on a GPU: the
latency benchmark's compiled mode.

Eager transformers launches a 7B VLM's kernels one by one from Python: at batch 1 its prefill takes about the
same time at 640 tokens as at 64 (FACTS.md), which hides what pruning buys. A CUDA graph replays captured
kernels without Python, but only at the shapes it was captured with, and in-LLM pruning changes the sequence
length mid-model. So the prefill runs as segments, each of one shape:

    vision -> [selection before the LLM] -> layers 0..k -> [selection after layer k] -> ... -> first token

with the model's own modules, the same strategy objects and the same observations as the hook engine
(`pruning_zoo.engine.run`), whose logits it reproduces (tests/test_segmented.py). Shapes are fixed when the batch
is uniform: every sample holds one image at the same positions and no padding, as the benchmark's prompts do.
A segment that cannot be captured (it reads a GPU value on the host, or copies from host memory) runs
eagerly between the graphs, and `eager_segments` says which and why. As in serving, vision blocks whose
output the model never reads (LLaVA's last CLIP block) are not run, and the KV cache is written once per layer.

On a GPU the capturable segments between two eager ones are captured in one graph, so that nothing is launched
between them, with CUDA events recorded inside it around each segment for the timings
(`pruning_zoo.bench.capture`, which captures and replays them).

Graphs remove launch overhead, not the kernels: a Llama layer launches some 25 small element-wise kernels
(RMSNorm, rotary, SiLU, residuals) around its matrix multiplications. With `fusion` (a torch.compile backend,
"inductor" on a GPU) the decoder layers and vision blocks run torch.compile'd forwards, which fuse them, and
so do the selection segments (scores, top-k, gathers: dozens of small kernels each); the graphs capture the
fused kernels. The linear layers reading one input (q/k/v, gate/up) are then multiplied as one matrix each, as
serving engines do (`pruning_zoo.engine.packing`). `pruning_zoo.bench.forwards` puts these forwards in place
of the modules' own while the prefill runs.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from pruning_zoo.bench.capture import Segment, SegmentChain
from pruning_zoo.bench.forwards import PrefillCache, attached, shadowed_forwards, skip_block
from pruning_zoo.engine.adapters import adapter_for
from pruning_zoo.engine.adapters.base import VISION_OBSERVATIONS
from pruning_zoo.engine.checks import check_indices, check_plan, check_selections
from pruning_zoo.engine.flops import Convention, DecoderShape, llm_flops
from pruning_zoo.engine.observe import AttentionProbe, sublayer_forward
from pruning_zoo.engine.packing import PackedProjections
from pruning_zoo.engine.patch_matmul import patch_matmul_forward
from pruning_zoo.engine.run import positions_after
from pruning_zoo.engine.sequence import Survivors
from pruning_zoo.engine.timing import Clock
from pruning_zoo.engine.vision_stages import VisionStages
from pruning_zoo.errors import PruningZooError
from pruning_zoo.strategy import PruningStrategy, ScoreContext, Selection, Stage, SublayerIO, plan_stages
from pruning_zoo.strategy.budget import Budget, check_budget, resolve_budget


def uniform_layout(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, int]:
    """(first position, count) of the one image every sample holds at the same positions; else a clear error."""
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise PruningZooError("the segmented prefill takes a batch without padding; pad-free prompts of one length "
                              "(or the eager engine, `pruning_zoo.engine.run.prune`) are needed")
    images = adapter.image_positions(input_ids)
    first = images[0]
    if any(len(sample) != 1 for sample in images) or any(not torch.equal(s[0], first[0]) for s in images):
        raise PruningZooError("the segmented prefill takes one image per sample at the same positions in every "
                              f"sample; got images at {[[(int(p[0]), p.numel()) for p in s] for s in images]} "
                              "(position, tokens); use the eager engine for other batches")
    return int(first[0][0]), int(first[0].numel())


class SegmentedPrefill(SegmentChain):
    """One prefill of a uniform batch under `strategy` at `budget`, as segments. `run()` executes it eagerly;
    on a GPU, `capture()` records each segment in a CUDA graph and `replay()` runs the graphs. After either,
    `logits` [B, vocab] are the last position's logits and `first_token` [B] their argmax. `fusion` names a
    torch.compile backend for the decoder layers, vision blocks and selections (None: the modules' own forwards)."""

    def __init__(self, model: nn.Module, strategy: PruningStrategy, budget: Budget, inputs: dict,
                 fusion: str | None = None):
        check_budget(budget)
        self.model, self.strategy = model, strategy
        self.adapter = adapter_for(model)
        self.input_ids = inputs["input_ids"]
        self.start, self.num_visual = uniform_layout(self.adapter, self.input_ids, inputs.get("attention_mask"))
        self.batch, self.length = self.input_ids.shape
        #: The strategy's stages inside the vision tower (run by the adapter's hooks in the vision segment).
        depth = self.adapter.vision_stage_depth
        self.tower = VisionStages(strategy, budget, self.adapter.num_layers, depth, self.adapter.identity)
        self.entry_positions, self.expected_embeds = self._model_entry(inputs)
        self.vision_inputs = self.adapter.capturable_vision_inputs(
            {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")})
        self.grid = self.adapter.image_grids([self.num_visual] * self.batch)[0]
        num_layers = self.adapter.num_layers
        self.stages = plan_stages(strategy, resolve_budget(budget, self.num_visual), self.num_visual, num_layers, depth)
        check_plan(strategy.name, self.stages, self.num_visual, num_layers, vision_blocks=depth)
        #: Vision blocks the model runs but never reads (LLaVA's last CLIP block): skipped, as serving engines do.
        self.skipped_vision_blocks = self.adapter.unused_vision_blocks
        self.vision_flops = [self.adapter.vision_flops(i, self.num_visual, skip_unused=True) for i in range(self.batch)]
        #: Layers whose sub-blocks the strategy summarizes, run by `sublayer_forward`; their sub-block tensors; their
        #: last inputs (hidden states and keyword arguments), which diagnostics time them on
        #: (scripts/summary_placement.py).
        self._watched = set(strategy.sublayer_layers(num_layers)) if "sublayer_summary" in strategy.observes else set()
        self._sublayers: dict[int, SublayerIO] = {}
        self._watched_inputs: dict[int, tuple[torch.Tensor, dict]] = {}
        self._validate = True
        #: Each stage's kept indices [B, keep] and how many tokens it chose from, as the last run left them.
        self.kept_by_stage: dict[Stage, tuple[torch.Tensor, int]] = {}
        self.fusion = fusion
        self._fused = [*self.adapter.layers, *(b for b in self.adapter.vision_blocks if b not in self.skipped_vision_blocks)]
        #: The forwards that stand in for the modules' own while the prefill runs.
        self._shadowed = {module: torch.compile(module.forward, backend=fusion) for module in self._fused} if fusion else {}
        #: Watched layers' forward, handing out their sub-block tensors: fused like the other layers where there is
        #: fusion, compiled for each sequence length (as measured by scripts/summary_placement.py).
        self._sublayer_forward = (torch.compile(sublayer_forward, backend=fusion, dynamic=False) if fusion and self._watched
                                  else sublayer_forward)
        self._shadowed.update(dict.fromkeys(self.skipped_vision_blocks, skip_block))
        #: Linear layers reading one input, multiplied as one matrix (q/k/v, gate/up), as serving engines do.
        self.packed = [PackedProjections(group) for group in self.adapter.packable_projections()] if fusion else []
        for pack in self.packed:
            self._shadowed.update(pack.forwards())
        #: Patch embeddings as one matrix multiplication (`pruning_zoo.engine.patch_matmul`), compiled: their layout
        #: changes fuse.
        self.patch_matmuls = self.adapter.patch_convolutions() if fusion else []
        self._shadowed.update({conv: torch.compile(patch_matmul_forward(conv), backend=fusion) for conv in self.patch_matmuls})
        super().__init__(self._build())
        if fusion:
            # The selections too: dozens of small kernels each (scores, top-k, gathers, index arithmetic), which
            # fused make a few. Not a selection on the host, which runs eagerly by design. Each is compiled for
            # its own shapes: as shape-general code inductor failed to lower pool's adaptive pooling. Inductor's
            # combo kernels put independent small kernels (TransPrune's per-layer TTV reductions and softmaxes)
            # into one launch each.
            options = {"combo_kernels": True} if fusion == "inductor" else None
            for segment in self.segments:
                if segment.selection and not self._declared_eager(segment):
                    segment.uncompiled = segment.run
                    segment.run = torch.compile(segment.run, backend=fusion, dynamic=False, options=options)

    # -- set-up --------------------------------------------------------------------------------------------
    def _model_entry(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The position ids and embeddings the model itself hands its language model for these inputs (one
        unpruned forward, outside any timing): positions are input preparation (M-RoPE's come from the image
        grids), and the embeddings check our vision segment."""
        seen = {}

        def read(module, args, kwargs):
            seen.update(positions=kwargs.get("position_ids"), embeds=kwargs["inputs_embeds"])

        handles = [self.adapter.language_model.register_forward_pre_hook(read, with_kwargs=True)]
        handles += self._tower_hooks()  # the embeddings of a tower that merges, which the vision segment must give
        handles += self.adapter.vision_hooks(frozenset())  # the family learns the image grids
        with attached(handles), torch.no_grad():
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        positions = seen["positions"]
        if positions is None:
            positions = torch.arange(self.length, device=self.input_ids.device)[None].expand(self.batch, -1)
        return positions.contiguous(), seen["embeds"]

    def _build(self) -> list[Segment]:
        segments = [Segment("vision", self._vision)]
        current = self.num_visual
        entry = next((s for s in self.stages if s.before_llm), None)
        merged = [s for s in self.stages if s.in_vision]
        if merged:  # the engine's own stage before the LLM: one token per merge group
            entry = Stage(None, keep=merged[-1].keep)
        if entry is not None:
            # Scoring and selecting, then gathering the survivors: a selection that must run eagerly (it reads
            # the host) leaves the gather to a graph.
            observes_vision = bool(self.strategy.observes & VISION_OBSERVATIONS)  # what the tower's hooks keep
            segments.append(Segment("selection before the LLM", functools.partial(self._select_entry, entry, current),
                                    selection=True, reads_previous=observes_vision or bool(merged)))
            segments.append(Segment("gather before the LLM", functools.partial(self._shrink, current), selection=True,
                                    gather=True))
            current = entry.keep
        first = 0
        for stage in (s for s in self.stages if s.in_llm):
            segments.append(Segment(f"layers {first}-{stage.after_layer}", functools.partial(self._layers, first, stage.after_layer)))
            # Each stage summarizes the watched layers since the previous one: every run of a segment, captured
            # or not, does the same work.
            summarized = sorted(layer for layer in self._watched if first <= layer <= stage.after_layer)
            earlier = sorted(layer for layer in self._watched if layer < first)
            segments.append(Segment(f"selection after layer {stage.after_layer}",
                                    functools.partial(self._select_in_llm, stage, current, summarized, earlier),
                                    selection=True, reads_previous=True))
            segments.append(Segment(f"gather after layer {stage.after_layer}",
                                    functools.partial(self._shrink, current, carry_summaries=bool(self._watched)),
                                    selection=True, gather=True))
            first, current = stage.after_layer + 1, stage.keep
        last = self.adapter.num_layers - 1
        segments.append(Segment(f"layers {first}-{last} and first token", functools.partial(self._layers, first, last, True)))
        return segments

    # -- segments ------------------------------------------------------------------------------------------
    def _tower_hooks(self) -> list:
        if not self.strategy.plans_vision:
            return []
        self.tower.validate = self._validate if hasattr(self, "_validate") else True
        return self.adapter.vision_stage_hooks(self.tower)

    def _vision(self) -> None:
        observed = self.strategy.observes
        with attached(self._tower_hooks() + (self.adapter.vision_hooks(observed) if observed else [])):
            features = self.adapter.image_features(self.vision_inputs)
        embeds = self.model.get_input_embeddings()(self.input_ids)
        s, n = self.start, self.num_visual
        hidden = torch.cat([embeds[:, :s], features.reshape(self.batch, n, -1).to(embeds.dtype), embeds[:, s + n :]], dim=1)
        # Nothing summarized yet (a state left by the previous run's last stage is not carried into this one).
        self.state.update(hidden=hidden, positions=self.entry_positions, summaries_at_image=None)

    def _layers(self, first: int, last: int, final: bool = False) -> None:
        hidden, positions = self.state["hidden"], self.state["positions"]
        kwargs = dict(
            attention_mask=None,  # causal over a pad-free sequence: SDPA's is_causal
            position_ids=self.adapter.layer_position_ids(positions),
            # The prefill writes its KV cache, as in serving.
            past_key_values=PrefillCache(config=self.model.config),
            use_cache=True,
            position_embeddings=self.adapter.rotary_embedding(hidden, positions),
        )
        for index in range(first, last + 1):
            layer = self.adapter.layers[index]
            if index == last and not final:
                self.state["stage_input"] = (hidden, kwargs)
            if index in self._watched:
                self._watched_inputs[index] = (hidden, kwargs)
                if self._validate:
                    self._check_sublayer_forward(layer, hidden, kwargs)
                hidden, self._sublayers[index] = self._sublayer_forward(layer, hidden, **kwargs)
                continue
            output = layer(hidden, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        self.state.update(hidden=hidden, layer_kwargs=kwargs)
        if final:
            normed = self.adapter.language_model.norm(hidden[:, -1:])
            logits = self.model.get_output_embeddings()(normed)[:, 0]
            self.state.update(logits=logits, first_token=logits.argmax(dim=-1))

    def _select_entry(self, stage: Stage, current: int) -> None:
        if any(s.in_vision for s in self.stages):  # one token per merge group, as the tower's hooks left them
            self._keep([self.tower.entry_selection(sample) for sample in range(self.batch)], stage, current)
            return
        hidden = self.state["hidden"]
        s = self.start
        observed = self.strategy.observes & VISION_OBSERVATIONS  # built only when asked for
        shared = {}  # afresh at every run: a captured run must compute what the images share, not reuse it
        contexts = [self._context(stage, hidden[sample, s : s + current], self.grid,
                                  self.adapter.vision_observations(sample, self.num_visual, shared) if observed else {})
                    for sample in range(self.batch)]
        if "instruction_embeddings" in self.strategy.observes:  # the pad-free prompt's rows after the image
            for sample, ctx in enumerate(contexts):
                ctx.observations = {**ctx.observations,
                                    "instruction_embeddings": lambda rows=hidden[sample, s + current:]: rows}
        self._keep(self._select(contexts), stage, current)

    def _select_in_llm(self, stage: Stage, current: int, summarized: list[int], earlier: list[int]) -> None:
        """`summarized`: the watched layers since the previous stage, which ran on the current sequence; `earlier`:
        those before, whose summaries at the image's current tokens the previous gathers carried here."""
        hidden = self.state["hidden"]
        s = self.start
        key_valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        # Every watched layer's summary at every sample's image tokens, [B, current]: those of the layers since the
        # previous stage summarized here, in one compiled selection (fused together), and read at the image's rows.
        at_image = {layer: self.state["summaries_at_image"][:, i] for i, layer in enumerate(earlier)}
        for layer in summarized:
            at_image[layer] = self.strategy.summarize_sublayers(self._sublayers[layer])[:, s : s + current]
        # Carried through the gather to the next stage, as the survivors' rows.
        self.state["summaries_at_image"] = torch.stack([at_image[layer] for layer in sorted(at_image)], dim=1) if at_image else None
        image = torch.arange(s, s + current, device=hidden.device)
        probe = AttentionProbe(self.adapter, stage.after_layer, self.state["stage_input"], hidden,
                               self.state["layer_kwargs"], key_valid, image_end=s + current, image=image)
        contexts = []
        for sample in range(self.batch):
            observations = probe.observations(sample, image)
            observations["sublayer_summary"] = functools.partial(self._sublayer_summary, at_image, stage, sample)
            contexts.append(self._context(stage, hidden[sample, s : s + current], None, observations))
        self._keep(self._select(contexts), stage, current)

    @staticmethod
    def _sublayer_summary(at_image: dict[int, torch.Tensor], stage: Stage, sample: int, layer: int) -> torch.Tensor:
        """As the engine's `sublayer_summary` observation, for a pad-free batch."""
        if layer not in at_image:
            raise PruningZooError(f"no sub-block summary of layer {layer} at the stage after layer {stage.after_layer}: "
                                  "the strategy's sublayer_layers must list it and it must run before the stage")
        return at_image[layer][sample]

    def _context(self, stage: Stage, tokens: torch.Tensor, grid, observations: dict) -> ScoreContext:
        return ScoreContext(stage=stage, tokens=tokens, num_layers=self.adapter.num_layers, grid=grid,
                            observations=observations, model=self.adapter.identity)

    def _select(self, contexts: list[ScoreContext]) -> list[Selection]:
        selections = self.strategy.select_images(contexts)
        if self._validate:  # reads indices on the host: only in the first, eager run, never in a capture
            check_selections(self.strategy.name, selections, contexts)
        return selections

    def _keep(self, selections: list[Selection], stage: Stage, current: int) -> None:
        """The selections as tensors in `state`, for the gather: `kept` [B, keep] image-token indices, and
        `merged` [B, keep, d] the rows to insert where the strategy gave features (None where it gave none)."""
        hidden = self.state["hidden"]
        kept = torch.stack([selection.keep.to(hidden.device) for selection in selections])
        self.kept_by_stage[stage] = (kept, current)  # a captured run's kept indices, rewritten by each replay
        merged = None
        if any(selection.features is not None for selection in selections):
            merged = torch.stack([
                hidden[sample, self.start + kept[sample]] if selection.features is None else selection.features.to(hidden.dtype)
                for sample, selection in enumerate(selections)
            ])
        self.state.update(kept=kept, merged=merged)

    def _shrink(self, current: int, carry_summaries: bool = False) -> None:
        """Keep each sample's selected image tokens (`merged` rows where the strategy gave them); after an in-LLM
        stage of a strategy summarizing sub-blocks, their summaries at the image's tokens too (`carry_summaries`)."""
        hidden = self.state["hidden"]
        batch, length = hidden.shape[:2]
        s, device = self.start, hidden.device
        if carry_summaries and self.state["summaries_at_image"] is not None:  # the survivors', for the next stage
            carried = self.state["summaries_at_image"]
            self.state["summaries_at_image"] = carried.gather(2, self.state["kept"][:, None].expand(-1, carried.shape[1], -1))
        kept = s + self.state["kept"]  # [B, keep], sequence rows
        if self.state["merged"] is None:  # one gather for the batch
            rows = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
        else:
            rows = self.state["merged"]
        shrunk = torch.cat([hidden[:, :s], rows, hidden[:, s + current :]], dim=1)
        step_index = torch.cat([
            torch.arange(s, device=device).expand(batch, -1),
            kept,
            torch.arange(s + current, length, device=device).expand(batch, -1),
        ], dim=1)
        step = Survivors(index=step_index, valid=torch.ones_like(step_index, dtype=torch.bool), source_length=length)
        before = torch.arange(s, s + current, device=device)
        changes = [(sample, before, kept[sample]) for sample in range(batch)]
        positions, _ = positions_after(self.adapter, self.strategy.params.positions, self.state["positions"], step, changes)
        self.state.update(hidden=shrunk, positions=positions)

    def check_kept(self) -> None:
        """Check on the host the indices each stage kept in the last run. The first run checks its selections
        as they are made, but it is compiled apart (the check reads the GPU), so this checks, after a replay,
        what the captured selections kept."""
        for stage, (kept, current) in self.kept_by_stage.items():
            for sample_kept in kept.cpu():
                check_indices(self.strategy.name, sample_kept, stage, current)

    # -- running -------------------------------------------------------------------------------------------
    def _forwards(self):
        return shadowed_forwards(self._shadowed) if self._shadowed else contextlib.nullcontext()

    @torch.no_grad()
    def run(self, clock: Clock | None = None) -> None:
        """Every segment eagerly, in order (with a clock: a span per segment, named by `capture.span_name`)."""
        with self._forwards():
            self._run(clock)

    def _run(self, clock: Clock | None) -> None:
        for segment in self.segments:
            with self._span(clock, segment):
                self._run_segment(segment)
            if self._validate and segment.name == "vision":
                self._check_embeddings()
        self._validate = False

    # -- checks against the model's own computation --------------------------------------------------------
    def _check_sublayer_forward(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
        """A watched layer's forward must compute what the layer's own does: a family whose decoder layers are not
        Llama-layout (`sublayer_forward`) fails here rather than giving other logits."""
        own = layer(hidden, **self._fresh_cache(kwargs))
        own = (own[0] if isinstance(own, tuple) else own).float()
        ours = sublayer_forward(layer, hidden, **self._fresh_cache(kwargs))[0].float()
        tolerance = 1e-4 if hidden.dtype == torch.float32 else 2e-2
        if not torch.allclose(ours, own, atol=tolerance * float(own.abs().max()), rtol=tolerance):
            raise PruningZooError(f"{type(layer).__name__} is not a Llama-layout decoder layer (pre-norm attention, then MLP, "
                                  f"each added to the residual stream): {self.strategy.name}'s sub-block tensors cannot "
                                  "be taken from it in the segmented prefill; use the eager engine")

    def _fresh_cache(self, kwargs: dict) -> dict:
        """A layer's keyword arguments with an empty KV cache, for a forward outside the prefill's own."""
        return {**kwargs, "past_key_values": PrefillCache(config=self.model.config)}

    def _check_embeddings(self) -> None:
        """Our vision segment must hand the language model what the model's own forward does."""
        ours, expected = self.state["hidden"].float(), self.expected_embeds.float()
        tolerance = 1e-4 if self.expected_embeds.dtype == torch.float32 else 2e-2
        if ours.shape != expected.shape or not torch.allclose(ours, expected, atol=tolerance * float(expected.abs().max()), rtol=tolerance):
            raise PruningZooError(f"the segmented prefill's embeddings differ from {type(self.model).__name__}'s own; its "
                                  "adapter's image_features does not match the model's forward: use the eager engine")
        self.expected_embeds = None

    @property
    def fused_parts(self) -> list[str]:
        """What runs through torch.compile (`fusion`): the latency benchmark records it with each cell."""
        return ["decoder layers", "vision blocks", "selections"] if self.fusion else []

    def _declared_eager(self, segment: Segment) -> str | None:
        """Why the strategy wants the segment run eagerly, whether or not a capture would succeed."""
        if segment.selection and not segment.gather and self.strategy.selects_on_host:
            return "selects on the host at every call (the strategy's selects_on_host)"
        return None

    # -- results -------------------------------------------------------------------------------------------
    @property
    def logits(self) -> torch.Tensor:
        return self.state["logits"]

    @property
    def first_token(self) -> torch.Tensor:
        return self.state["first_token"]

    def visual_per_layer(self) -> list[int]:
        """Visual tokens per image in each decoder layer."""
        layers = self.adapter.num_layers
        counts = [self.num_visual] * layers
        for stage in self.stages:
            first = 0 if stage.after_layer is None else stage.after_layer + 1
            counts[first:] = [stage.keep] * (layers - first)
        return counts

    def llm_flops(self, convention: Convention) -> int:
        """FLOPs of the decoder layers for the whole batch (the flops.py convention)."""
        text = self.length - self.num_visual
        tokens = [text + visual for visual in self.visual_per_layer()]
        return self.batch * llm_flops(tokens, DecoderShape.from_config(self.adapter.text_config), convention)
