"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop per image, a square patch grid."""

from __future__ import annotations

import math

import torch

from pruning_zoo.engine.adapters.base import VISION_OBSERVATIONS, ModelAdapter, stack_image_features
from pruning_zoo.engine.adapters.clip import ClipTowerMerge, ClipTowerWatch, TokenSources
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

    @property
    def vision_stage_depth(self):
        """The CLIP blocks up to the one whose output LLaVA reads (`vision_feature_layer`; -2: all but the last),
        with the 'default' select strategy (CLS no visual token, so never merged)."""
        if self._first_row != 1:
            return None
        layers = self._watch.feature_layer if isinstance(self._watch.feature_layer, (list, tuple)) else [self._watch.feature_layer]
        return max(self._watch.block(layer) for layer in layers) + 1

    def vision_stage_hooks(self, stages):
        self._merges = ClipTowerMerge(self.model.model.vision_tower, self._watch.blocks, stages,
                                      proportional=stages.strategy.proportional_attention())
        return self._merges.hooks()  # `_merges` stays: vision_flops reads what the last forward ran

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
        """With stages inside the tower, each block counted on the rows it ran on (the merge's own work, a key
        projection per merging block, is not counted)."""
        merges = getattr(self, "_merges", None)
        layers = len(self._watch.blocks) - (len(self.unused_vision_blocks) if skip_unused else 0)
        per_block = None
        if merges is not None and merges.stages.active and image_index < len(merges.stages.images):
            per_block = merges.stages.units_per_block(image_index, layers)
        return clip_vision_tower_flops(self.model, crops=1, tokens=num_visual,
                                       skipped=len(self.unused_vision_blocks) if skip_unused else 0, patches_per_block=per_block)


def clip_vision_tower_flops(model, crops: int, tokens: int, skipped: int = 0, patches_per_block: list[int] | None = None) -> int:
    """A CLIP tower over `crops` crops (every block: transformers runs those after the feature layer too, unless
    `skipped` of them are) plus the projector over the `tokens` features it receives. `patches_per_block`: the
    patches (CLS aside) each block ran on, where a stage inside the tower merged some."""
    vision, text = model.config.vision_config, model.config.get_text_config()
    tower = clip_vision_flops(crops, vision.image_size, vision.patch_size, vision.hidden_size,
                              vision.intermediate_size, vision.num_hidden_layers - skipped, patches_per_block)
    return tower + projector_flops(tokens, vision.hidden_size, text.hidden_size)
