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

    @property
    def vision_stage_depth(self):
        return len(self.visual.blocks)

    def vision_stage_hooks(self, stages):
        self._merges = QwenTowerMerge(self.visual, self._merge**2, stages)
        return self._merges.hooks()  # `_merges` stays: vision_flops reads what the last forward ran

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
        merges = getattr(self, "_merges", None)
        if merges is not None and merges.stages.active and image_index < len(merges.stages.images):
            # Stages inside the tower: each block on its rows (one attention segment per image; the merges' own
            # key projections not counted), the merger on the units left.
            units = merges.stages.units_per_block(image_index, len(self.visual.blocks) + 1)
            for index, (block, count) in enumerate(zip(self.visual.blocks, units)):
                rows, area = count * self._merge**2, self._merge**2
                attention = sum((area * n) ** 2 for n in merges.segments[index][image_index])
                total += rows * (linear_macs(block.attn) + linear_macs(block.mlp)) + 2 * attention * block.norm1.weight.shape[0]
            return total + units[-1] * linear_macs(self.visual.merger)
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

    def vision_stage_hooks(self, stages):
        config = self.model.config.vision_config
        self._merges = QwenWindowedTowerMerge(self.visual, self._merge**2, stages, config)
        return self._merges.hooks()

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


class QwenTowerMerge:
    """Stages inside Qwen2-VL's tower (and, through `QwenWindowedTowerMerge`, Qwen2.5-VL's): whole merge units (`area` consecutive rows, a 2x2 patch unit that the
    PatchMerger concatenates) merge, so the merger still sees groups of four rows. The blocks after a stage run on
    the kept units' rows, each with its own rotary position (a group keeps its kept unit's), and with attention
    segments rebuilt from the plan (one per image: counts known on the host, nothing read from the GPU); at the
    tower's exit the merger's output (and the last hidden state) has one row per original unit again. Still images
    only (a video's frames are attention segments of their own). No proportional attention: the blocks' attention
    takes no mask."""

    def __init__(self, visual: nn.Module, area: int, stages):
        self.visual, self.area, self.stages = visual, area, stages
        self._inputs: dict[int, torch.Tensor] = {}
        self._tables = None
        #: Per block of the last forward, per image, the units of each attention segment it ran.
        self.segments: dict[int, list[list[int]]] = {}

    def hooks(self) -> list:
        handles = [self.visual.register_forward_pre_hook(self._start, with_kwargs=True)]
        handles += [block.register_forward_pre_hook(self._enter(i), with_kwargs=True) for i, block in enumerate(self.visual.blocks)]
        handles.append(self.visual.register_forward_hook(self._exit, with_kwargs=True))
        return handles

    def _start(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        grids = [tuple(int(v) for v in row) for row in grid.tolist()]
        pixels = args[0] if args else kwargs["hidden_states"]
        self.stages.start([t * h * w // self.area for t, h, w in grids], pixels.device)
        if self.stages.active and any(t != 1 for t, _, _ in grids):
            raise PruningZooError("stages inside Qwen2-VL's vision tower merge still images only; this batch has a "
                                  f"video (grids {grids})")
        self._inputs, self._tables = {}, None

    def _counts(self) -> list[int]:
        return [image.origin.shape[0] for image in self.stages.images]

    def _segment_units(self, block: int) -> list[int]:
        """Units of each attention segment of `block` (Qwen2-VL: one per image)."""
        return [units for image in self._image_segments(block) for units in image]

    def _image_segments(self, block: int) -> list[list[int]]:
        """Per image, the units of each of its attention segments in `block`."""
        return [[count] for count in self._counts()]

    def _image_rows(self, counts: list[int]) -> list[slice]:
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count * self.area)
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def _enter(self, index: int):
        def hook(module, args, kwargs):
            if not self.stages.active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._tables is None:  # the tower's own tables and segments, for every original row
                self._tables = kwargs["position_embeddings"], kwargs["cu_seqlens"]
            if index - 1 in self._inputs:
                hidden = self._merge(index - 1, hidden)
            if index in self.stages.blocks_with_stages():
                self._inputs[index] = hidden
            self.segments[index] = self._image_segments(index)  # what the block runs on, for its FLOPs
            kwargs = dict(kwargs)
            if self.stages.merged_before(index):
                (cos, sin), segments = self._tables
                first, rows = 0, []
                offsets = torch.arange(self.area, device=cos.device)
                for image in self.stages.images:
                    rows.append((first + image.origin.to(cos.device)[:, None] * self.area + offsets).flatten())
                    first += image.units * self.area
                rows = torch.cat(rows)
                kwargs["position_embeddings"] = (cos[rows], sin[rows])
                lengths = torch.tensor([0] + [count * self.area for count in self._segment_units(index)])
                kwargs["cu_seqlens"] = lengths.cumsum(0).to(dtype=segments.dtype, device=segments.device)
                if kwargs.get("max_seqlen") is not None:
                    kwargs["max_seqlen"] = int(lengths.max())
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _merge(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        stored = self._inputs.pop(block)
        slices = self._image_rows(self._counts())
        layer = self.visual.blocks[block]
        width = hidden.shape[-1]
        cache = {}

        def keys(image: int) -> torch.Tensor:  # before rotary embedding, mean over the unit's rows
            if "keys" not in cache:
                qkv = layer.attn.qkv(layer.norm1(stored))
                cache["keys"] = qkv.view(qkv.shape[0], 3, layer.attn.num_heads, -1)[:, 1]
            rows = cache["keys"][slices[image]]
            return rows.view(-1, self.area, *rows.shape[1:]).mean(dim=1)

        units = self.stages.merge(block, [hidden[rows].view(-1, self.area, width) for rows in slices], keys)
        return torch.cat([u.reshape(-1, width) for u in units])

    def _unmerge_units(self, merged: torch.Tensor) -> torch.Tensor:
        """Merger output [sum of current units, D] back to one row per original unit, image by image."""
        bounds = [0]
        for count in self._counts():
            bounds.append(bounds[-1] + count)
        return torch.cat([self.stages.unmerge(i, merged[a:b]) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])

    def _exit(self, module, args, kwargs, output):
        if not self.stages.active:
            return None
        counts = self._counts()
        output.pooler_output = self._unmerge_units(output.pooler_output)
        last = output.last_hidden_state
        if last is not None:
            width = last.shape[-1]
            output.last_hidden_state = torch.cat([
                self.stages.unmerge(i, last[rows].view(-1, self.area, width)).reshape(-1, width)
                for i, rows in enumerate(self._image_rows(counts))])
        return output


class QwenWindowedTowerMerge(QwenTowerMerge):
    """Qwen2.5-VL's tower: its blocks see the units in window order (`window_index`), and all but
    `fullatt_block_indexes` attend within windows. Units merge only within their window (each window keeps a
    share of the stage's count fixed by the plan: `vision_stages.window_quotas`), so the blocks' window segments
    (`cu_window_seqlens`) and image segments (`cu_seqlens`) are rebuilt from host counts. The merger's output is
    unmerged in window order, before the tower's own reverse reindexing; the tokens kept before the LLM are mapped
    from window order to the image's token order."""

    def __init__(self, visual: nn.Module, area: int, stages, config):
        super().__init__(visual, area, stages)
        self.config = config
        self.full_attention = set(getattr(visual, "fullatt_block_indexes", ()))
        #: Per (grids, device): each image's units per window and each window-order position's token.
        self._layouts: dict[tuple, tuple[list[list[int]], list[torch.Tensor]]] = {}

    def hooks(self) -> list:
        handles = super().hooks()
        handles.append(self.visual.merger.register_forward_hook(self._merger_exit))
        return handles

    def _start(self, module, args, kwargs):
        from transformers.vision_utils import get_vision_window_index

        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        host_grid = grid.cpu()
        grids = [tuple(int(v) for v in row) for row in host_grid.tolist()]
        pixels = args[0] if args else kwargs["hidden_states"]
        counts = [t * h * w // self.area for t, h, w in grids]
        key = (tuple(grids), pixels.device)
        if key not in self._layouts:  # made once per grids: a captured tower copies nothing from the host
            window_index, bounds = get_vision_window_index(host_grid, self.config.spatial_merge_size,
                                                            self.config.window_size, self.config.patch_size)
            bounds = bounds.tolist()
            window_units = [int(b - a) // self.area for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            windows, token_of, first, taken = [], [], 0, 0
            for count in counts:
                image_windows, total = [], 0
                while total < count:
                    image_windows.append(window_units[taken])
                    total, taken = total + window_units[taken], taken + 1
                windows.append(image_windows)
                token_of.append((window_index[first : first + count] - first).to(pixels.device))
                first += count
            self._layouts[key] = windows, token_of
        windows, token_of = self._layouts[key]
        depth = len(self.visual.blocks)
        windowed = [index for index in range(depth) if index not in self.full_attention]
        across_from = windowed[-1] if windowed else 0  # merges after the last windowed block may cross windows
        self.stages.start(counts, pixels.device, windows=windows, token_of=token_of, across_from=across_from)
        if self.stages.active and any(t != 1 for t, _, _ in grids):
            raise PruningZooError("stages inside Qwen2.5-VL's vision tower merge still images only; this batch has a "
                                  f"video (grids {grids})")
        self._inputs, self._tables = {}, None

    def _image_segments(self, block: int) -> list[list[int]]:
        if block in self.full_attention:
            return super()._image_segments(block)
        return [list(image.windows) for image in self.stages.images]

    def _merger_exit(self, module, args, output):
        return self._unmerge_units(output) if self.stages.active else None

    def _exit(self, module, args, kwargs, output):
        if not self.stages.active:
            return None
        last = output.last_hidden_state  # in window order, as the blocks ran; the merger's output is unmerged already
        if last is not None:
            width = last.shape[-1]
            output.last_hidden_state = torch.cat([
                self.stages.unmerge(i, last[rows].view(-1, self.area, width)).reshape(-1, width)
                for i, rows in enumerate(self._image_rows(self._counts()))])
        return output
