"""What strategies observe inside the LLM: attention onto an image's tokens, computed from a layer's own
q/k projections and rotary tables for the chosen query rows only, so the model keeps SDPA or FlashAttention."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pruning_zoo.adapters import ModelAdapter


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def sublayer_hooks(layer: torch.nn.Module, store) -> list:
    """Forward hooks on a Llama-layout decoder layer's sub-blocks that hand `store(part, tensor)` their outputs,
    the tensors of the `sublayer_io` observation: attn_in (input_layernorm), attn_out (self_attn, before the
    residual add), mlp_in (post_attention_layernorm), mlp_out (mlp)."""

    def keep(part: str):
        def hook(module, args, output):
            store(part, output[0] if isinstance(output, tuple) else output)

        return hook

    parts = {"attn_in": layer.input_layernorm, "attn_out": layer.self_attn,
             "mlp_in": layer.post_attention_layernorm, "mlp_out": layer.mlp}
    return [module.register_forward_hook(keep(part)) for part, module in parts.items()]


def rotated_keys(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(normed input, keys with rotary applied) of a whole batch at `layer`: [B, L, d] and [B, kv_heads, L, dh].
    Computed once per layer and shared by every image's observation (one projection, not one per image).

    hidden: [B, L, d] the layer's input; cos, sin: [B or 1, L, head_dim] its rotary tables."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    keys = attention.k_proj(normed).view(*hidden.shape[:2], -1, attention.head_dim).transpose(1, 2)
    return normed, keys * cos[:, None] + rotate_half(keys) * sin[:, None]


def attention_probabilities(
    layer: torch.nn.Module,
    normed: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Post-softmax attention [heads, len(rows), L] of one sample at `layer`, fp32, causal and padding masks
    applied, exactly as the layer's attention would compute it for those query rows.

    normed: [L, d] the layer's normed input; keys: [kv_heads, L, dh] its rotated keys (`rotated_keys`);
    cos, sin: [L, head_dim] its rotary tables; key_valid: [L].
    """
    attention = layer.self_attn
    queries = attention.q_proj(normed[rows]).view(len(rows), -1, attention.head_dim).transpose(0, 1)
    queries = queries * cos[rows] + rotate_half(queries) * sin[rows]
    keys = keys.repeat_interleave(queries.shape[0] // keys.shape[0], dim=0)  # grouped-query attention
    scores = (queries.float() @ keys.float().transpose(-1, -2)) * attention.scaling
    positions = torch.arange(normed.shape[0], device=normed.device)
    allowed = (positions[None, :] <= rows[:, None]) & key_valid[None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


class AttentionProbe:
    """Observations offered at an in-LLM stage after layer `stage_layer` (names strategies list in `observes`):

    - last_token_attention: [heads, n] attention of the last prompt token onto the image at the stage layer;
    - received_attention: [heads, n] attention the image's tokens receive, averaged over all query rows;
    - instruction_attention: [heads, n] averaged over the query rows after the image, at the stage layer;
    - next_layer_instruction_attention: the same rows, but the stage layer's output through the next layer's
      norm, projections and rotary tables (TransPrune's IGA).
    """

    def __init__(self, adapter: ModelAdapter, stage_layer: int, stage_input, stage_output, next_layer_kwargs, key_valid,
                 image_end: int | None = None):
        self.adapter = adapter
        self.stage_layer = stage_layer
        self.stage_hidden, self.stage_kwargs = stage_input
        self.next_hidden, self.next_kwargs = stage_output, next_layer_kwargs
        self.key_valid = key_valid
        #: Where every image ends when the caller knows it (a pad-free batch of one layout): the rows after it
        #: are then a fixed range, and only those are projected.
        self.image_end = image_end
        self._keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def observations(self, sample: int, positions: torch.Tensor) -> dict:
        # Query rows are chosen with tensors, never by reading the mask on the host, so that observing does
        # not wait for the GPU (the segmented prefill captures the selection in a CUDA graph).
        valid = self.key_valid[sample]
        order = torch.arange(valid.shape[0], device=valid.device)

        def last_row() -> tuple[torch.Tensor, None]:
            return torch.where(valid, order, -1).max().reshape(1), None

        def all_rows() -> tuple[torch.Tensor, torch.Tensor]:
            return order, valid

        def rows_after_image() -> tuple[torch.Tensor, torch.Tensor | None]:
            if self.image_end is not None:
                return order[self.image_end :], None
            return order, valid & (order > positions.max())

        def at_stage(rows) -> torch.Tensor:
            return self._mean_onto(self.stage_layer, self.stage_hidden, self.stage_kwargs, sample, *rows(), positions)

        def at_next(rows) -> torch.Tensor:
            return self._mean_onto(self.stage_layer + 1, self.next_hidden, self.next_kwargs, sample, *rows(), positions)

        return {
            "last_token_attention": functools.partial(at_stage, last_row),
            "received_attention": functools.partial(at_stage, all_rows),
            "instruction_attention": functools.partial(at_stage, rows_after_image),
            "next_layer_instruction_attention": functools.partial(at_next, rows_after_image),
        }

    def _mean_onto(self, layer_index, hidden, kwargs, sample, rows, row_weights, positions) -> torch.Tensor:
        """Attention of the query `rows` onto the image's `positions`, averaged over the rows (only those whose
        weight is True, when `row_weights` is given): [heads, n]."""
        cos, sin = kwargs["position_embeddings"]
        layer = self.adapter.layers[layer_index]
        if layer_index not in self._keys:
            self._keys[layer_index] = rotated_keys(layer, hidden, cos, sin)
        normed, keys = self._keys[layer_index]
        pick = sample if cos.shape[0] > 1 else 0
        probabilities = attention_probabilities(
            layer, normed[sample], keys[sample], cos[pick], sin[pick], rows, self.key_valid[sample]
        )[:, :, positions]
        if row_weights is None:
            return probabilities.mean(dim=1)
        # masked_fill, not a product: a padding row attends to nothing and its softmax is NaN.
        chosen = probabilities.masked_fill(~row_weights[None, :, None], 0.0).sum(dim=1)
        return chosen / row_weights.sum()
