"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop per image, a square patch grid."""

from __future__ import annotations

import math

import torch

from pruning_zoo.engine.adapters.base import VISION_OBSERVATIONS, ModelAdapter, stack_image_features
from pruning_zoo.engine.adapters.clip import ClipTowerWatch, TokenSources
from pruning_zoo.engine.flops import clip_vision_flops, projector_flops


class LlavaAdapter(ModelAdapter):
    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self._watch = ClipTowerWatch(model.model.vision_tower, model.model.multi_modal_projector, config.vision_feature_layer)
        #: CLIP's CLS row is not among the visual tokens unless the select strategy is 'full'.
        self._first_row = 1 if config.vision_feature_select_strategy == "default" else 0

    @property
    def vision_blocks(self):
        return list(self._watch.blocks)

    @property
    def unused_vision_blocks(self):
        return self._watch.unused_blocks()

    def image_grids(self, counts):
        # CLIP's patches without CLS, row-major: a square grid.
        return [(side, side) if (side := math.isqrt(n)) ** 2 == n else None for n in counts]

    def vision_hooks(self, observed):
        return self._watch.hooks() if observed & VISION_OBSERVATIONS else []

    def token_sources(self, image_index: int, num_visual: int, shared: dict | None = None) -> TokenSources:
        shared = {} if shared is None else shared
        if ("rows", num_visual) not in shared:  # the same for every image of this size
            # Built where the model is, so that observing copies nothing from the host.
            device = next(self.model.model.multi_modal_projector.parameters()).device
            rows = torch.arange(self._first_row, self._first_row + num_visual, device=device)
            shared["rows", num_visual] = rows, rows - self._first_row, torch.zeros(num_visual, dtype=torch.bool, device=device)
        rows, feature_rows, synthetic = shared["rows", num_visual]
        return TokenSources(
            crop=torch.full((num_visual,), image_index, device=rows.device),
            row=rows,
            feature_row=feature_rows,
            synthetic=synthetic,
            crops=range(image_index, image_index + 1),
        )

    def vision_observations(self, image_index: int, num_visual: int, shared: dict | None = None) -> dict:
        """CLIP observations of this image's one crop; `vision_cls_features` too (the CLS row is no visual
        token under the 'default' select strategy)."""
        shared = {} if shared is None else shared
        sources = self.token_sources(image_index, num_visual, shared)
        return self._watch.observations(sources, with_cls_features=self._first_row == 1, shared=shared)

    def image_features(self, vision_inputs):
        config = self.model.config
        return stack_image_features(self.model.model.get_image_features(
            pixel_values=vision_inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ))

    def vision_flops(self, image_index: int, num_visual: int, skip_unused: bool = False) -> int:
        return clip_vision_tower_flops(self.model, crops=1, tokens=num_visual,
                                       skipped=len(self.unused_vision_blocks) if skip_unused else 0)


def clip_vision_tower_flops(model, crops: int, tokens: int, skipped: int = 0) -> int:
    """A CLIP tower over `crops` crops (every block: transformers runs those after the feature layer too, unless
    `skipped` of them are) plus the projector over the `tokens` features it receives."""
    vision, text = model.config.vision_config, model.config.get_text_config()
    tower = clip_vision_flops(crops, vision.image_size, vision.patch_size, vision.hidden_size,
                              vision.intermediate_size, vision.num_hidden_layers - skipped)
    return tower + projector_flops(tokens, vision.hidden_size, text.hidden_size)
