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
