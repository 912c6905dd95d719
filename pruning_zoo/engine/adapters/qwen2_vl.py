"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT, 2x2 merged patches, no CLS, 3-D M-RoPE positions.

The vision tower runs every image's patches as one sequence, split into attention segments by `cu_seqlens`
(one per image, or per window in Qwen2.5-VL's windowed blocks). Patches come in merge units of 2x2, one unit
per visual token; Qwen2.5-VL permutes the units into window order before its blocks and back after the merger.
"""

from __future__ import annotations

import torch
from torch import nn

from pruning_zoo.engine.adapters.base import VISION_OBSERVATIONS, ModelAdapter, stack_image_features
from pruning_zoo.engine.observe import rotate_half
from pruning_zoo.errors import PruningZooError
from pruning_zoo.strategy import fp32_products

#: What `capturable_vision_inputs` adds: the keys under which transformers' vision_utils take them precomputed.
PRECOMPUTED_VISION_INPUTS = ("cu_seqlens", "position_ids", "window_index", "cu_window_seqlens")


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per row of all Linear layers in `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class Qwen2VLAdapter(ModelAdapter):
    def __init__(self, model):
        super().__init__(model)
        self.visual = model.model.visual
        self._grids: list[tuple[int, int, int]] = []  # (t, h, w) in patches, per image
        #: Per block, the attention segments it ran with, and (when observed) its input and rotary tables.
        self._segments: dict[int, torch.Tensor] = {}
        self._block_inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._merger_input: torch.Tensor | None = None
        self._orders_grids: list[tuple[int, int, int]] = []
        self._orders: dict[tuple, torch.Tensor] = {}

    # -- vision tower --------------------------------------------------------------------------------------
    @property
    def vision_module(self):
        return self.visual

    @property
    def vision_blocks(self):
        return list(self.vision_module.blocks)

    @property
    def _merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def vision_hooks(self, observed):
        def record_grid(module, args, kwargs):
            grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            self._grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]

        def record_block(index):
            def hook(module, args, kwargs):
                self._segments[index] = kwargs["cu_seqlens"]
                if watch_inputs:
                    self._block_inputs[index] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

            return hook

        def record_merger_input(module, args):
            self._merger_input = args[0]

        watch_inputs = bool(observed & VISION_OBSERVATIONS)
        handles = [self.visual.register_forward_pre_hook(record_grid, with_kwargs=True)]
        handles += [block.register_forward_pre_hook(record_block(i), with_kwargs=True) for i, block in enumerate(self.visual.blocks)]
        if watch_inputs:
            handles.append(self.visual.merger.register_forward_pre_hook(record_merger_input))
        return handles

    def capturable_vision_inputs(self, vision_inputs):
        """The tower derives its attention segments and rotary positions from `image_grid_thw` with `.tolist()`
        and host loops: from a GPU tensor, waits for the GPU. transformers takes them precomputed (its
        `vision_utils` pop them from the tower's kwargs), so they are made here once from a host copy of the
        grids: segment bounds on the host (they size SDPA's per-image splits), positions on the device. Flash
        attention needs its bounds on the device and their maximum: left to the tower, uncaptured."""
        # transformers' vision utilities are imported where used: importing them takes most of a second, and
        # `pruning-zoo list` loads every family's adapter.
        from transformers.utils.generic import is_flash_attention_requested
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

        if is_flash_attention_requested(self.model.config.vision_config):
            return vision_inputs
        grid = vision_inputs["image_grid_thw"]
        host_grid = grid.cpu()
        return {**vision_inputs, "image_grid_thw": host_grid, "cu_seqlens": get_vision_cu_seqlens(host_grid),
                "position_ids": get_vision_position_ids(host_grid, self._merge).to(grid.device)}

    def image_features(self, vision_inputs):
        precomputed = {key: vision_inputs[key] for key in PRECOMPUTED_VISION_INPUTS if key in vision_inputs}
        output = self.model.model.get_image_features(
            pixel_values=vision_inputs["pixel_values"], image_grid_thw=vision_inputs["image_grid_thw"], **precomputed
        )
        return stack_image_features(output)

    def image_grids(self, counts):
        grids = [(h // self._merge, w // self._merge) for t, h, w in self._grids if t == 1]
        if [r * c for r, c in grids] != list(counts):
            return [None] * len(counts)
        return grids

    def _window_index(self) -> torch.Tensor:
        """Block position -> merge unit, over all images (the identity where blocks see units in order)."""
        return torch.arange(sum(t * h * w for t, h, w in self._grids) // self._merge**2)

    def _token_order(self, first: int, units: int, device: torch.device) -> torch.Tensor:
        """Where each of an image's units sits among its block positions (window order), on `device`. Kept while
        the grids stay the same, so that a captured selection reads a tensor made before the capture instead
        of copying one from the host."""
        if self._orders_grids != self._grids:
            self._orders_grids, self._orders = list(self._grids), {}
        key = (first, units, device)
        if key not in self._orders:
            self._orders[key] = (self._window_index()[first : first + units] - first).to(device)
        return self._orders[key]

    def _units(self, image_index: int) -> tuple[int, int]:
        """(first unit, units) of an image; its units take the same contiguous range in window order."""
        sizes = [t * h * w // self._merge**2 for t, h, w in self._grids]
        return sum(sizes[:image_index]), sizes[image_index]

    def vision_observations(self, image_index: int, num_visual: int, shared: dict | None = None) -> dict:
        """No CLS: `vision_attention` is the mean attention each token's patches receive in a block (over the
        queries of their attention segment), averaged over its 2x2 merge unit, per head (VisionZip's no-CLS
        rule); keys and features are the unit's four patch rows (keys averaged over them)."""
        first, units = self._units(image_index)
        if units != num_visual:
            raise PruningZooError(f"image {image_index} has {units} merge units but {num_visual} placeholder tokens")
        unit_area = self._merge**2
        rows = slice(first * unit_area, (first + units) * unit_area)

        def to_token_order(per_position: torch.Tensor) -> torch.Tensor:
            result = torch.empty_like(per_position)
            result[self._token_order(first, units, per_position.device)] = per_position
            return result

        def block_index(layer: int) -> int:
            depth = len(self.visual.blocks)
            if not -depth <= layer < depth:
                raise PruningZooError(f"vision layer {layer} names no block of this {depth}-block tower: use 0..{depth - 1} or -1..-{depth}")
            return layer % depth

        def projections(layer: int):
            index = block_index(layer)
            block = self.visual.blocks[index]
            hidden, (cos, sin) = self._block_inputs[index]
            heads = block.attn.num_heads
            qkv = block.attn.qkv(block.norm1(hidden[rows])).view(units * unit_area, 3, heads, -1)
            return index, block, qkv, cos[rows], sin[rows]

        def vision_keys(layer: int = -2) -> torch.Tensor:
            _, _, qkv, _, _ = projections(layer)
            keys = qkv[:, 1].reshape(units, unit_area, *qkv.shape[2:]).mean(dim=1)
            return to_token_order(keys)

        def vision_attention(layer: int = -2) -> torch.Tensor:
            index, block, qkv, cos, sin = projections(layer)
            cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
            # Rotated in fp32 and rounded back to the weights' dtype, as the block's own attention does; the
            # scores are fp32 sums of their exact products (tensor cores on a GPU). Kept in fp32, the rotated q
            # and k made the scores an fp32 matmul: on an H100 VisionZip's selection took 1.0-1.1 ms at batch 1
            # and 7.6-7.8 ms at batch 8 (4cbb569, 8e4dc76), and 0.72-0.75 and 5.2-5.4 ms since (b4c8bc6).
            query, key = ((x.float() * cos + rotate_half(x.float()) * sin).to(qkv.dtype) for x in (qkv[:, 0], qkv[:, 1]))
            received = torch.zeros(qkv.shape[2], units * unit_area, device=qkv.device)
            bounds = self._segments[index].tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                start, end = max(start, rows.start) - rows.start, min(end, rows.stop) - rows.start
                if start >= end:
                    continue
                q, k = query[start:end].transpose(0, 1), key[start:end].transpose(0, 1)  # [heads, s, dh]
                probabilities = (fp32_products(q, k.transpose(-1, -2)) * block.attn.scaling).softmax(dim=-1)
                received[:, start:end] = probabilities.mean(dim=1)
            per_unit = received.view(-1, units, unit_area).mean(dim=-1)  # [heads, units]
            return to_token_order(per_unit.T).T

        def vision_features() -> torch.Tensor:
            features = self._merger_input[rows]
            return to_token_order(features.reshape(units, unit_area, -1))

        def vision_project(features: torch.Tensor) -> torch.Tensor:
            kept = self._merger_input  # our own call passes the merger's pre-hook too
            try:
                return self.visual.merger(features.reshape(-1, features.shape[-1]))
            finally:
                self._merger_input = kept

        return {
            "vision_attention": vision_attention,
            "vision_keys": vision_keys,
            "vision_features": vision_features,
            "vision_project": vision_project,
        }

    def vision_flops(self, image_index: int, num_visual: int, skip_unused: bool = False) -> int:
        """Patch embedding, every block (projections, attention within the image's segments, MLP) and the
        merger, for this image's patches. The merger reads the last block: `skip_unused` leaves nothing out."""
        t, h, w = self._grids[image_index]
        patches = t * h * w
        first = sum(a * b * c for a, b, c in self._grids[:image_index])
        embed = self.visual.patch_embed.proj
        total = patches * embed.in_channels * embed.out_channels * int(torch.tensor(embed.kernel_size).prod())
        for index, block in enumerate(self.visual.blocks):
            bounds = self._segments[index].tolist()
            lengths = [min(e, first + patches) - max(s, first) for s, e in zip(bounds[:-1], bounds[1:])]
            dim = block.norm1.weight.shape[0]
            total += patches * (linear_macs(block.attn) + linear_macs(block.mlp))
            total += 2 * sum(n * n for n in lengths if n > 0) * dim
        return total + patches // self._merge**2 * linear_macs(self.visual.merger)

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
        order = torch.arange(step.source_length, device=step.index.device)
        for sample, before, kept in changes:
            axes = positions[-3:, sample if positions.shape[1] > 1 else 0]
            gap = axes[:, before].max() - axes[:, kept].max()
            shift[sample] += gap * (order > before.max())  # a mask, not a slice: no wait for the GPU
            total[sample] += gap
        return step.gather(shift, dim=1), total


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's text decoder; its vision blocks see merge units in window order."""

    def capturable_vision_inputs(self, vision_inputs):
        """Qwen2-VL's, plus the window order (on the device: it indexes the patches) and window bounds (on the
        host), which the tower derives from the grids with host loops too."""
        inputs = super().capturable_vision_inputs(vision_inputs)
        if inputs is vision_inputs:
            return inputs
        from transformers.vision_utils import get_vision_window_index

        config = self.model.config.vision_config
        window_index, cu_window_seqlens = get_vision_window_index(
            inputs["image_grid_thw"], config.spatial_merge_size, config.window_size, config.patch_size)
        return {**inputs, "window_index": window_index.to(vision_inputs["image_grid_thw"].device),
                "cu_window_seqlens": cu_window_seqlens}

    def _window_index(self) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        config = self.model.config.vision_config
        grid = torch.tensor(self._grids)
        window_index, _ = get_vision_window_index(grid, config.spatial_merge_size, config.window_size, config.patch_size)
        return window_index
