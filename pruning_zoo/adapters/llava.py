"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop per image, a square patch grid."""

from __future__ import annotations

import math

import torch

from pruning_zoo.adapters.base import ModelAdapter
from pruning_zoo.errors import PruningZooError


class LlavaAdapter(ModelAdapter):
    def __init__(self, model):
        super().__init__(model)
        #: Inputs of each CLIP encoder layer in the last vision forward, [crops, 1 + patches, width].
        self._vision_inputs: dict[int, torch.Tensor] = {}

    def image_grids(self, counts):
        # CLIP's patches without CLS, row-major: a square grid.
        return [(side, side) if (side := math.isqrt(n)) ** 2 == n else None for n in counts]

    @property
    def _clip_layers(self):
        return self.model.model.vision_tower.encoder.layers

    def vision_hooks(self):
        def keep_input(index):
            def hook(module, args, kwargs):
                self._vision_inputs[index] = args[0] if args else kwargs["hidden_states"]

            return hook

        return [
            layer.register_forward_pre_hook(keep_input(index), with_kwargs=True)
            for index, layer in enumerate(self._clip_layers)
        ]

    def vision_observations(self, image_index: int) -> dict:
        """- vision_cls_attention(layer=-2): [heads, patches] CLS row of that CLIP layer's own attention
             probabilities (softmax over CLS and every patch), patch columns;
           - vision_keys(layer=-2): [1 + patches, heads, head_dim] that layer's k_proj output, CLS first.
        `layer` counts like `vision_feature_layer`: -2 is the layer whose output LLaVA feeds the projector."""

        def layer_input(layer: int):
            # hidden_states[j] is the output of block j-1, so vision_feature_layer j names block j-1.
            index = layer % (len(self._clip_layers) + 1) - 1
            if index < 0 or not -len(self._clip_layers) - 1 <= layer <= len(self._clip_layers):
                raise PruningZooError(
                    f"vision layer {layer} names no CLIP block: use 1..{len(self._clip_layers)} or -1..-{len(self._clip_layers)}"
                )
            block = self._clip_layers[index]
            return block, block.layer_norm1(self._vision_inputs[index][image_index])

        def split_heads(block, projected):
            attention = block.self_attn
            return projected.view(projected.shape[0], attention.num_heads, attention.head_dim)

        def vision_keys(layer: int = -2) -> torch.Tensor:
            block, normed = layer_input(layer)
            return split_heads(block, block.self_attn.k_proj(normed))

        def vision_cls_attention(layer: int = -2) -> torch.Tensor:
            block, normed = layer_input(layer)
            query = split_heads(block, block.self_attn.q_proj(normed[:1])).transpose(0, 1)  # [heads, 1, dh]
            keys = vision_keys(layer).transpose(0, 1)  # [heads, 1 + patches, dh]
            scores = (query.float() @ keys.float().transpose(-1, -2)) * block.self_attn.scale
            return scores.softmax(dim=-1)[:, 0, 1:]

        return {"vision_cls_attention": vision_cls_attention, "vision_keys": vision_keys}
