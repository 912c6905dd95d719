"""FLOPs accounting from the token counts each layer actually processed (METHODS.md, FLOPs conventions).

A decoder layer with n tokens costs 4nd^2 + 2n^2d + c*n*d*m, counted as multiply-accumulates, with c = 2
(FastV's convention, two MLP matrices: `2ndm`) or c = 3 (the SwiGLU MLP's three matrices, TransPrune's and
SparseVLM's convention: `3ndm`). Layers are summed with each layer's own n. Vision encoders are counted the
same way per transformer block, separately. torch's FlopCounterMode counts 2 FLOPs per multiply-accumulate:
tests check that our figures are exactly half of its count on a tiny model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Convention = Literal["2ndm", "3ndm"]
CONVENTIONS: tuple[Convention, ...] = ("2ndm", "3ndm")


def transformer_layer_flops(tokens: int, hidden: int, intermediate: int, mlp_matrices: int) -> int:
    """4nd^2 (q, k, v, o projections) + 2n^2d (scores and weighted sum) + mlp_matrices * n*d*m."""
    n, d, m = tokens, hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * m


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    layers: int

    @classmethod
    def from_config(cls, text_config) -> DecoderShape:
        return cls(text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers)


def llm_flops(tokens_per_layer: list[int], shape: DecoderShape, convention: Convention) -> int:
    """FLOPs of the decoder layers for one sequence, given the tokens each layer processed."""
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"{len(tokens_per_layer)} token counts for a decoder of {shape.layers} layers")
    mlp_matrices = {"2ndm": 2, "3ndm": 3}[convention]
    return sum(transformer_layer_flops(n, shape.hidden, shape.intermediate, mlp_matrices) for n in tokens_per_layer)


def clip_vision_flops(crops: int, image_size: int, patch_size: int, hidden: int, intermediate: int, layers: int,
                      patches_per_block: list[int] | None = None) -> int:
    """A CLIP tower over `crops` crops: the patch embedding plus `layers` blocks on the patches and CLS
    (GELU MLP: two matrices). LLaVA runs every block up to the selected one; we count all it computes. A stage
    inside the tower (ToMe) runs later blocks on fewer rows: `patches_per_block` gives each block's patches."""
    patches = (image_size // patch_size) ** 2
    embedding = patches * 3 * patch_size * patch_size * hidden
    per_block = [patches] * layers if patches_per_block is None else list(patches_per_block)[:layers]
    blocks = sum(transformer_layer_flops(n + 1, hidden, intermediate, 2) for n in per_block)
    return crops * (embedding + blocks)


def projector_flops(tokens: int, vision_hidden: int, text_hidden: int) -> int:
    """LLaVA's two-layer MLP projector on `tokens` vision features."""
    return tokens * (vision_hidden * text_hidden + text_hidden * text_hidden)
