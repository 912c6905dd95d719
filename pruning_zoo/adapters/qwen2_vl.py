"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT, 2x2 merged patches, no CLS, 3-D M-RoPE positions."""

from __future__ import annotations

import torch

from pruning_zoo.adapters.base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
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

    # -- positions: [3, B, L] (t, h, w), or [4, B, L] with 1-D text positions first, as generate() passes them
    def rotary_embedding(self, hidden_states, position_ids):
        return self.language_model.rotary_emb(hidden_states, position_ids[-3:])

    def layer_position_ids(self, positions):
        return positions[0] if positions.shape[0] == 4 else positions

    def renumber_shift(self, positions, step, changes):
        """M-RoPE: kept image tokens keep their (t, h, w) positions relative to each other (the spatial layout
        is what they encode); the tokens after an image move down by how much less of the position range the
        image now spans (the text after an image starts one past its largest position)."""
        shift = torch.zeros(step.index.shape[0], step.source_length, dtype=torch.long, device=step.index.device)
        total = torch.zeros(step.index.shape[0], dtype=torch.long, device=step.index.device)
        for sample, before, kept in changes:
            axes = positions[-3:, sample if positions.shape[1] > 1 else 0]
            gap = axes[:, before].max() - axes[:, kept].max()
            shift[sample, int(before.max()) + 1 :] += gap
            total[sample] += gap
        return step.gather(shift, dim=1), total

    def image_grids(self, counts):
        grids = list(self._grids)
        if [r * c for r, c in grids] != list(counts):
            return [None] * len(counts)
        return grids


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL's text decoder is Qwen2-VL's; its vision tower's window attention changes nothing here."""
