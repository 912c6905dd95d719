"""What strategies can observe of a CLIP vision tower and LLaVA's projector (LLaVA-1.5 and LLaVA-NeXT).

Each observation is aligned with one image's visual tokens as they enter the LLM: row i describes the i-th
visual token. A token comes from one crop's CLIP sequence (CLS at row 0, then the patches); the adapter says
which crop and row each token comes from (`TokenSources`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pruning_zoo.engine.packing import own_linear
from pruning_zoo.errors import PruningZooError


@dataclasses.dataclass(frozen=True)
class TokenSources:
    """Where one image's visual tokens come from, [n] each."""

    #: Index of the crop (in the tower's batch) each token comes from.
    crop: torch.Tensor
    #: Row in that crop's CLIP sequence (0 is CLS).
    row: torch.Tensor
    #: Row in that crop's projector input.
    feature_row: torch.Tensor
    #: Tokens that are no CLIP output (LLaVA-NeXT's image-newline); they point at the token before them.
    synthetic: torch.Tensor
    #: The crops these tokens come from, a contiguous range of the tower's batch (known on the host, so that
    #: observing never waits for the GPU: the selection can be captured in a CUDA graph).
    crops: range


class ClipTowerWatch:
    """Keeps, for the last vision forward, each CLIP block's input, the last block's output and the projector's
    input. Only attached when a strategy observes the vision tower: the tensors stay alive until the next one."""

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer):
        self.blocks = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
        self.projector = projector
        self.feature_layer = feature_layer
        #: hidden_states[j] as CLIP numbers them: input of block j, and hidden_states[L] the last block's output.
        self.hidden_states: dict[int, torch.Tensor] = {}
        self.projector_input: torch.Tensor | None = None

    def hooks(self) -> list:
        def keep_input(index):
            def hook(module, args, kwargs):
                self.hidden_states[index] = args[0] if args else kwargs["hidden_states"]

            return hook

        def keep_output(module, args, kwargs, output):
            self.hidden_states[len(self.blocks)] = output[0] if isinstance(output, tuple) else output

        def keep_projector_input(module, args):
            self.projector_input = args[0]

        handles = [block.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        handles.append(self.blocks[-1].register_forward_hook(keep_output, with_kwargs=True))
        handles.append(self.projector.register_forward_pre_hook(keep_projector_input))
        return handles

    def unused_blocks(self) -> list[nn.Module]:
        """The blocks after the last one whose output the projector reads (`feature_layer`)."""
        layers = self.feature_layer if isinstance(self.feature_layer, (list, tuple)) else [self.feature_layer]
        return list(self.blocks[max(self.block(layer) for layer in layers) + 1 :])

    def block(self, layer: int) -> int:
        """The block whose output is hidden_states[layer] (`layer` counts like `vision_feature_layer`)."""
        count = len(self.blocks)
        if not -count <= layer <= count or layer % (count + 1) == 0:
            raise PruningZooError(
                f"vision layer {layer} names no CLIP block: use 1..{count} or -1..-{count} "
                "(numbered like vision_feature_layer: -2 is the penultimate block)"
            )
        return layer % (count + 1) - 1

    def _keys(self, layer: int, shared: dict) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """The block computing hidden_states[layer], its normed input and its keys by head, every crop's:
        [crops, 1 + patches, width] and [crops, 1 + patches, heads, head_dim]."""
        if ("keys", layer) not in shared:
            block = self.blocks[self.block(layer)]
            normed = block.layer_norm1(self.hidden_states[self.block(layer)])
            shared["keys", layer] = block, normed, split_heads(block, own_linear(block.self_attn.k_proj, normed))
        return shared["keys", layer]

    def _cls_attention(self, layer: int, shared: dict) -> torch.Tensor:
        """The CLS row's attention at that block, every crop's, [crops, heads, 1 + patches]."""
        if ("cls", layer) not in shared:
            block, normed, keys = self._keys(layer, shared)
            query = split_heads(block, own_linear(block.self_attn.q_proj, normed[:, :1]))  # [crops, 1, heads, head_dim]
            scores = torch.einsum("cqhd,ckhd->chqk", query.float(), keys.float()) * block.self_attn.scale
            shared["cls", layer] = scores.softmax(dim=-1)[:, :, 0]
        return shared["cls", layer]

    def observations(self, sources: TokenSources, with_cls_features: bool, shared: dict) -> dict:
        """Observations for one image (see docs/plugins.md for their shapes and meaning). What they derive from
        the tower (keys, CLS attention) is computed once for every crop and kept in `shared`, which the images
        of one selection share."""
        device = next(self.projector.parameters()).device
        sources = dataclasses.replace(
            sources, **{name: getattr(sources, name).to(device) for name in ("crop", "row", "feature_row", "synthetic")}
        )

        def vision_keys(layer: int = -2) -> torch.Tensor:
            _, _, keys = self._keys(layer, shared)
            return keys[sources.crop, sources.row]

        def vision_attention(layer: int = -2) -> torch.Tensor:
            attention = self._cls_attention(layer, shared)[sources.crop, :, sources.row].T  # [heads, n]
            return attention.masked_fill(sources.synthetic, 0.0)

        def vision_features() -> torch.Tensor:
            return self.projector_input[sources.crop, sources.feature_row]

        def vision_project(features: torch.Tensor) -> torch.Tensor:
            kept = self.projector_input  # our own call passes the projector's pre-hook too
            try:
                return self.projector(features)
            finally:
                self.projector_input = kept

        observations = {
            "vision_attention": vision_attention,
            "vision_keys": vision_keys,
            "vision_features": vision_features,
            "vision_project": vision_project,
        }
        if with_cls_features and isinstance(self.feature_layer, int):
            crop = sources.crops.start
            observations["vision_cls_features"] = lambda: self.hidden_states[self.feature_layer % (len(self.blocks) + 1)][crop, 0]
        return observations


def split_heads(block: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    attention = block.self_attn
    return projected.view(*projected.shape[:-1], attention.num_heads, attention.head_dim)


class ClipTowerMerge:
    """Stages inside a CLIP tower (LLaVA-1.5): the rows entering block j+1 are merged per image (CLS, row 0, never
    is), the later blocks run on them with, where the strategy asks, ToMe's proportional attention (log of each
    key's size added to the attention logits, through the blocks' attention mask), and at the tower's exit every
    hidden state the model may read gets one row per original patch again. Images of one tower batch share one
    plan (LLaVA-1.5's images all have the same patches)."""

    def __init__(self, tower: nn.Module, blocks, stages, proportional: bool):
        self.tower, self.blocks, self.stages, self.proportional = tower, blocks, stages, proportional
        #: Per block, [crops, patches] the current row (after CLS) of each original patch, for the rows entering it.
        self.groups: list[torch.Tensor | None] = []
        self._inputs: dict[int, torch.Tensor] = {}

    def hooks(self) -> list:
        handles = [block.register_forward_pre_hook(self._enter(index), with_kwargs=True) for index, block in enumerate(self.blocks)]
        handles.append(self.tower.register_forward_hook(self._exit, with_kwargs=True))
        return handles

    def _enter(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                self.stages.start([hidden.shape[1] - 1] * hidden.shape[0], hidden.device)
                self.groups, self._inputs = [], {}
            if not self.stages.active:
                return None
            if index - 1 in self._inputs:
                hidden = self._merge(index - 1, hidden)
            merged = self.stages.merged_before(index)
            self.groups.append(torch.stack([image.group for image in self.stages.images]) if merged else None)
            if index in self.stages.blocks_with_stages():
                self._inputs[index] = hidden
            args, kwargs = list(args), dict(kwargs)
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
            if merged and self.proportional:
                sizes = torch.stack([image.sizes for image in self.stages.images])  # [crops, n]
                bias = torch.cat([torch.zeros_like(sizes[:, :1]), sizes.log()], dim=1).to(hidden.dtype)[:, None, None]
                if len(args) > 1:  # CLIPEncoder passes the mask (None for a vision tower) positionally
                    args[1] = bias if args[1] is None else args[1] + bias
                else:
                    mask = kwargs.get("attention_mask")
                    kwargs["attention_mask"] = bias if mask is None else mask + bias
            return tuple(args), kwargs

        return hook

    def _merge(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        """The rows of block `block`'s output merged by the stages after it."""
        stored = self._inputs.pop(block)
        cache = {}

        def keys(image: int) -> torch.Tensor:
            if "keys" not in cache:
                layer = self.blocks[block]
                cache["keys"] = split_heads(layer, own_linear(layer.self_attn.k_proj, layer.layer_norm1(stored[:, 1:])))
            return cache["keys"][image]

        units = self.stages.merge(block, [row[1:, None] for row in hidden], keys)
        if len({u.shape[0] for u in units}) != 1:
            raise PruningZooError("the images of one CLIP batch must keep as many tokens at each vision stage")
        return torch.cat([hidden[:, :1], torch.stack(units)[:, :, 0]], dim=1)

    def _unmerge(self, block: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """A hidden state with the rows entering `block` (the output of block-1, same rows) back to every patch."""
        groups = self.groups[block] if block < len(self.groups) else None
        if hidden is None or groups is None:
            return hidden
        index = groups.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return torch.cat([hidden[:, :1], hidden[:, 1:].gather(1, index)], dim=1)

    def _exit(self, module, args, kwargs, output):
        if not self.stages.active:
            return None
        states = getattr(output, "hidden_states", None)
        if states is not None:
            output.hidden_states = tuple(self._unmerge(max(k - 1, 0), state) for k, state in enumerate(states))
        output.last_hidden_state = self._unmerge(len(self.blocks) - 1, output.last_hidden_state)
        return output
