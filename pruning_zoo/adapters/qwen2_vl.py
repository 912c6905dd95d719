"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT, 2x2 merged patches, no CLS, 3-D M-RoPE positions."""

from __future__ import annotations

import torch

from pruning_zoo.adapters.base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    # M-RoPE gives image tokens (t, h, w) positions; a contiguous renumbering of them is not defined.
    supports_renumbered_positions = False

    def __init__(self, model):
        super().__init__(model)
        self._grids: list[tuple[int, int]] = []

    def vision_hooks(self):
        merge = self.model.config.vision_config.spatial_merge_size

        def record_grid(module, args, kwargs):
            grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid_thw is not None:
                # Merged tokens come out row-major over (t, h/merge, w/merge); one image is one frame.
                self._grids = [(int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist() if t == 1]

        return [self.model.model.visual.register_forward_pre_hook(record_grid, with_kwargs=True)]

    def image_grids(self, counts):
        grids = list(self._grids)
        if [r * c for r, c in grids] != list(counts):
            return [None] * len(counts)
        return grids


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL's text decoder is Qwen2-VL's; its vision tower's window attention changes nothing here."""
