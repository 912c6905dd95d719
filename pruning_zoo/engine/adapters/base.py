"""What the engine needs to know about a model family, behind one small interface.

Everything model-specific lives in an adapter; the engine and the strategies never look at the model class.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from pruning_zoo.engine.packing import shared_input_linears
from pruning_zoo.engine.patch_matmul import is_patch_convolution
from pruning_zoo.engine.sequence import Survivors

# Observations of the vision tower (docs/plugins.md); their hooks attach only when a strategy observes one.
from pruning_zoo.strategy import VISION_OBSERVATIONS, ModelIdentity  # noqa: F401 - re-exported


class MethodWatch:
    """Calls `before(bound_arguments)` ahead of `obj.name(...)` until removed, like a forward pre-hook for a
    method that is no module (e.g. `get_image_features`, which generate() may call on its own). It shadows the
    method with an instance attribute and deletes it on `remove()`, so the class is never touched."""

    def __init__(self, obj, name: str, before):
        self.obj, self.name = obj, name
        method = getattr(obj, name)
        signature = inspect.signature(method)

        @functools.wraps(method)
        def watched(*args, **kwargs):
            before(signature.bind_partial(*args, **kwargs).arguments)
            return method(*args, **kwargs)

        setattr(obj, name, watched)

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


def stack_image_features(output) -> torch.Tensor:
    """`get_image_features`' result as one [images, n, d] tensor, whichever form this transformers version
    returns: a model output holding `pooler_output`, a tensor, or one tensor per image."""
    features = getattr(output, "pooler_output", output)
    if isinstance(features, (list, tuple)):
        return torch.stack(list(features))
    return features


class ModelAdapter:
    """Adapter for a transformers `...ForConditionalGeneration` VLM whose decoder layers follow the Llama
    layout (input_layernorm, self_attn.{q,k}_proj, post_attention_layernorm, mlp) and whose rotary
    embedding is folded into (cos, sin) tensors with the sequence on dim -2."""

    def __init__(self, model: nn.Module):
        self.model = model

    # -- structure -----------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def vision_module(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_blocks(self) -> list[nn.Module]:
        """The vision tower's repeated blocks (what the compiled mode fuses); none where not declared."""
        return []

    @property
    def unused_vision_blocks(self) -> list[nn.Module]:
        """Vision blocks the model runs but whose output it never reads (LLaVA reads the penultimate CLIP block;
        transformers runs the last one too). The segmented prefill skips them, as serving engines do. None by
        default."""
        return []

    def packable_projections(self) -> list[list[nn.Linear]]:
        """Groups of linear layers that read one input (q/k/v, gate/up) in the decoder layers and the vision
        blocks the segmented prefill runs: its compiled mode multiplies each group as one matrix, as serving
        engines do (`pruning_zoo.engine.packing`)."""
        blocks = [*self.layers, *(block for block in self.vision_blocks if block not in self.unused_vision_blocks)]
        return [group for block in blocks for group in shared_input_linears(block)]

    def patch_convolutions(self) -> list[nn.Module]:
        """The vision tower's patch embeddings (convolutions whose stride is their kernel): the compiled mode
        computes them as one matrix multiplication each (`pruning_zoo.engine.patch_matmul`), as serving engines do."""
        return [module for module in self.vision_module.modules() if is_patch_convolution(module)]

    @functools.cached_property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__), self.vision_module)

    def attention_implementation(self) -> str:
        return self.text_config._attn_implementation or "sdpa"

    # -- images --------------------------------------------------------------------------------------
    def image_positions(self, input_ids: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per sample, the sequence positions of each image's visual tokens: contiguous runs of the image
        placeholder token (never hard-coded offsets)."""
        result = []
        for row in input_ids:
            positions = (row == self.image_token_id).nonzero().flatten()
            if positions.numel() == 0:
                result.append([])
                continue
            breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
            result.append(list(torch.tensor_split(positions, breaks.tolist())))
        return result

    def image_grids(self, counts: list[int]) -> list[tuple[int, int] | None]:
        """(rows, cols) of each image's visual tokens in raster order, or None where they form no single grid."""
        return [None] * len(counts)

    def read_inputs(self, kwargs: dict) -> None:
        """See the VLM's forward arguments (image sizes, grids) before it runs."""

    def vision_hooks(self, observed: frozenset[str]) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that watch the vision tower for this forward; `observed` names what the strategy observes."""
        return []

    @property
    def vision_stage_depth(self) -> int | None:
        """For families with stages inside the vision tower (`Stage.vision_block`): the tower's blocks a merge makes
        cheaper for the model, those up to the last one whose output it reads. None: no such stage (the default)."""
        return None

    def vision_stage_hooks(self, stages) -> list:
        """Hooks that apply `stages` (a `pruning_zoo.engine.vision_stages.VisionStages`) inside the vision tower:
        plan at its entry, merge between its blocks, one row per original unit again at its exit."""
        return []

    def vision_observations(self, image_index: int, num_visual: int, shared: dict | None = None) -> dict:
        """Vision-encoder observations for the `image_index`-th image of the batch, aligned with its
        `num_visual` visual tokens; none by default. The images of one selection pass one `shared` dict: what
        is derived from the tower's forward for every image is computed once, on first use, and kept there."""
        return {}

    def capturable_vision_inputs(self, vision_inputs: dict) -> dict:
        """`vision_inputs` plus whatever the tower would otherwise derive from them by waiting for the GPU on
        the host (which a CUDA graph cannot hold), computed once before the segmented prefill; `image_features`
        passes it on. Most towers derive nothing: the inputs as they are."""
        return vision_inputs

    def image_features(self, vision_inputs: dict) -> torch.Tensor:
        """The projected visual tokens of every image, [images, n, d], for images that all give n tokens (the
        segmented prefill's uniform batches), computed by the model's own `get_image_features`."""
        raise NotImplementedError(f"{type(self).__name__} does not run a segmented prefill")

    def vision_flops(self, image_index: int, num_visual: int, skip_unused: bool = False) -> int:
        """FLOPs (multiply-accumulates) the vision tower and projector spent on this image in this forward;
        with `skip_unused`, without the `unused_vision_blocks` (what the segmented prefill computes)."""
        raise NotImplementedError(f"{type(self).__name__} does not count vision FLOPs")

    # -- positions -----------------------------------------------------------------------------------
    def rotary_embedding(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model.rotary_emb(hidden_states, position_ids)

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """The `position_ids` decoder layers receive, given the sequence's position ids."""
        return positions

    def renumber_shift(self, positions: torch.Tensor, step: Survivors, changes) -> tuple[torch.Tensor, torch.Tensor]:
        """How far `positions='renumber'` moves each survivor of `step` down, [B, L'], and per sample how far
        it moves every later (generated) token, [B]. `changes` lists (sample, image positions before, kept).

        1-D positions: every survivor moves down by the tokens dropped before it, so positions stay contiguous.
        """
        return step.dropped_before(), step.total_dropped()
