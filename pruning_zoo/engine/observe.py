"""What strategies observe inside the LLM: attention onto an image's tokens, computed from a layer's own
q/k projections and rotary tables for the chosen query rows only, so the model keeps SDPA or FlashAttention."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from pruning_zoo.engine.packing import own_linear
from pruning_zoo.errors import PruningZooError
from pruning_zoo.strategy import SublayerIO, fp32_products

if TYPE_CHECKING:
    from pruning_zoo.engine.adapters.base import ModelAdapter


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


def sublayer_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, SublayerIO]:
    """A Llama-layout decoder layer's forward (pre-norm attention, then MLP, each added to the residual stream: what
    `sublayer_hooks` assumes) that also returns its sub-block tensors, for a pad-free batch.

    The segmented prefill runs watched layers through it compiled, so that they are fused like the others and hand
    out their tensors with no hooks running eagerly inside them. Summarizing them waits for the stage: fused into
    the layer, TransPrune's summary took 8-14 us a layer of LLaVA-1.5-7B on an H100, apart 0 us in the layer and
    11-19 us a stage for one to three layers (scripts/summary_placement.py). Its output is checked against the
    layer's own forward (`SegmentedPrefill`'s first run)."""
    attn_in = layer.input_layernorm(hidden_states)
    attn_out = layer.self_attn(hidden_states=attn_in, **kwargs)[0]
    hidden_states = hidden_states + attn_out
    mlp_in = layer.post_attention_layernorm(hidden_states)
    mlp_out = layer.mlp(mlp_in)
    valid = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
    return hidden_states + mlp_out, SublayerIO(attn_in, attn_out, mlp_in, mlp_out, valid)


def rotated_keys(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(normed input, keys with rotary applied) of a whole batch at `layer`: [B, L, d] and [B, kv_heads, L, dh].
    Computed once per layer and shared by every image's observation (one projection, not one per image).

    hidden: [B, L, d] the layer's input; cos, sin: [B or 1, L, head_dim] its rotary tables."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    keys = own_linear(attention.k_proj, normed).view(*hidden.shape[:2], -1, attention.head_dim).transpose(1, 2)
    return normed, keys * cos[:, None] + rotate_half(keys) * sin[:, None]


def attention_probabilities(
    layer: torch.nn.Module,
    normed: torch.Tensor,
    keys: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: torch.Tensor | slice,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Post-softmax attention [B, heads, R, L] of each sample's query `rows` at `layer`, fp32, causal and padding
    masks applied, exactly as the layer's attention would compute it for those rows.

    normed: [B, L, d] the layer's normed input; keys: [B, kv_heads, L, dh] its rotated keys (`rotated_keys`);
    cos, sin: [B or 1, L, head_dim] its rotary tables; rows: [B, R] query positions, or a slice of positions
    every sample shares, read in place (a gather of them was a kernel of its own); key_valid: [B, L].
    """
    attention = layer.self_attn
    batch = normed.shape[0]
    if isinstance(rows, slice):
        picked = normed[:, rows]
        row_cos, row_sin = cos[:, rows][:, None], sin[:, rows][:, None]
        rows = torch.arange(normed.shape[1], device=normed.device)[rows].expand(batch, -1)
    else:
        picked = normed.gather(1, rows[..., None].expand(-1, -1, normed.shape[-1]))
        at_rows = rows[..., None].expand(-1, -1, cos.shape[-1])
        row_cos, row_sin = (table.expand(batch, -1, -1).gather(1, at_rows)[:, None] for table in (cos, sin))
    count = rows.shape[1]
    queries = own_linear(attention.q_proj, picked).view(batch, count, -1, attention.head_dim).transpose(1, 2)
    queries = queries * row_cos + rotate_half(queries) * row_sin
    if queries.shape[1] != keys.shape[1]:  # grouped-query attention
        keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    scores = fp32_products(queries, keys.transpose(-1, -2)) * attention.scaling
    positions = torch.arange(normed.shape[1], device=normed.device)
    allowed = (positions[None, None, :] <= rows[..., None]) & key_valid[:, None, :]
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)


class AttentionProbe:
    """Observations offered at an in-LLM stage after layer `stage_layer` (names strategies list in `observes`):

    - last_token_attention: [heads, n] attention of the last prompt token onto the image at the stage layer;
    - received_attention: [heads, n] attention the image's tokens receive, averaged over all query rows;
    - instruction_attention: [heads, n] averaged over the query rows after the image, at the stage layer;
    - next_layer_instruction_attention: the same rows, but the stage layer's output through the next layer's
      norm, projections and rotary tables (TransPrune's IGA);
    - next_layer_last_token_attention: [heads, n] the last prompt token's row computed that way (PyramidDrop);
    - stage_keys(rows="image"): [r, kv_heads, head_dim] the stage layer's keys with rotary applied, at the image's
      tokens or (rows="after_image") at the rows after the image to the prompt's end (DART's pivots);
    - stage_output_final_norm(rows="image"): [r, d] the stage layer's output through the model's final norm, at
      those rows (DART's similarities);
    - instruction_attention_rows: [heads, r, n] the rows `instruction_attention` averages, each on its own: every
      query after the image to the prompt's end, onto the image, at the stage layer (SparseVLM's text raters).

    Where every sample asks for the same number of query rows (the last token; the rows after the image when
    `image_end` is known), the probabilities are computed once for the whole batch, on first use, and each
    image reads its own; otherwise sample by sample.
    """

    def __init__(self, adapter: ModelAdapter, stage_layer: int, stage_input, stage_output, next_layer_kwargs, key_valid,
                 image_end: int | None = None, image: torch.Tensor | None = None):
        self.adapter = adapter
        self.stage_layer = stage_layer
        self.stage_hidden, self.stage_kwargs = stage_input
        self.next_hidden, self.next_kwargs = stage_output, next_layer_kwargs
        self.key_valid = key_valid
        #: Where every image ends when the caller knows it (a pad-free batch of one layout): the rows after it
        #: are then a fixed range, and only those are projected.
        self.image_end = image_end
        #: Every sample's image positions when they are the same (that tensor, passed to `observations`): each
        #: observation is then averaged over its query rows once for the batch.
        self.image = image
        self._keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batch: dict[tuple[int, str], torch.Tensor] = {}  # (layer, rows) -> [B, heads, R, L]
        self._at_image: dict[tuple[int, str], torch.Tensor] = {}  # (layer, rows) -> [B, heads, n] at `image`
        self._final: torch.Tensor | None = None  # the stage output through the final norm, [B, L, d]

    def observations(self, sample: int, positions: torch.Tensor) -> dict:
        # Query rows are chosen with tensors, never by reading the mask on the host, so that observing does
        # not wait for the GPU (the segmented prefill captures the selection in a CUDA graph).
        order = torch.arange(self.key_valid.shape[1], device=self.key_valid.device)

        def last_rows() -> torch.Tensor:  # [B, 1]: each sample's last real token
            return torch.where(self.key_valid, order, -1).max(dim=1, keepdim=True).values

        def after_image_rows() -> slice:  # the same rows in every sample
            return slice(self.image_end, None)

        def batched(layer_index: int, hidden, kwargs, name: str, rows) -> torch.Tensor:
            key = layer_index, name
            if key not in self._batch:
                self._batch[key] = self._probabilities(layer_index, hidden, kwargs, rows())
            if positions is not self.image:
                return self._batch[key][sample][:, :, positions].mean(dim=1)
            if key not in self._at_image:
                # Averaged over the query rows first: a reduction over contiguous rows, then one gather (the
                # other order gathered with a stride, 13 us of TransPrune's stage on an H100)
                self._at_image[key] = self._batch[key].mean(dim=2)[..., positions]
            return self._at_image[key][sample]

        def one_sample(layer_index: int, hidden, kwargs, row_weights: torch.Tensor) -> torch.Tensor:
            """Averaged over the query rows whose weight is True, all rows computed for this sample alone."""
            probabilities = self._probabilities(layer_index, hidden, kwargs, order[None], sample)[0][:, :, positions]
            # masked_fill, not a product: a padding row attends to nothing and its softmax is NaN.
            chosen = probabilities.masked_fill(~row_weights[None, :, None], 0.0).sum(dim=1)
            return chosen / row_weights.sum()

        def instruction(layer_index: int, hidden, kwargs, name: str) -> torch.Tensor:
            if self.image_end is not None:
                return batched(layer_index, hidden, kwargs, name, after_image_rows)
            valid = self.key_valid[sample]
            return one_sample(layer_index, hidden, kwargs, valid & (order > positions.max()))

        def own_rows(rows: str) -> torch.Tensor | slice:
            """This sample's rows: its image's tokens, or those after the image to the prompt's end."""
            if rows == "image":
                return positions
            if rows != "after_image":
                raise PruningZooError(f"rows={rows!r} is no choice of an in-LLM observation; choose 'image' or 'after_image'")
            if self.image_end is not None:
                return slice(self.image_end, None)
            # Only the hook engine (eager) gets here; the segmented prefill knows `image_end`.
            return torch.nonzero(self.key_valid[sample] & (order > positions.max())).squeeze(1)

        def instruction_rows(layer_index: int, hidden, kwargs) -> torch.Tensor:
            """[heads, r, n]: the query rows after the image, unaveraged (the batch's, shared with instruction_attention,
            where `image_end` is known; else only this sample's rows are computed)."""
            if self.image_end is None:
                rows = own_rows("after_image")[None]
                return self._probabilities(layer_index, hidden, kwargs, rows, sample)[0][..., positions]
            key = layer_index, "instruction"
            if key not in self._batch:
                self._batch[key] = self._probabilities(layer_index, hidden, kwargs, after_image_rows())
            return self._batch[key][sample][..., positions]

        stage = (self.stage_layer, self.stage_hidden, self.stage_kwargs)
        after = (self.stage_layer + 1, self.next_hidden, self.next_kwargs)
        return {
            "last_token_attention": functools.partial(batched, *stage, "last", last_rows),
            "received_attention": lambda: one_sample(*stage, self.key_valid[sample]),
            "instruction_attention": functools.partial(instruction, *stage, "instruction"),
            "next_layer_instruction_attention": functools.partial(instruction, *after, "instruction"),
            "next_layer_last_token_attention": functools.partial(batched, *after, "last", last_rows),
            "stage_keys": lambda rows="image": self._stage_keys(sample)[:, own_rows(rows)].transpose(0, 1),
            "stage_output_final_norm": lambda rows="image": self._final_normed()[sample, own_rows(rows)],
            "instruction_attention_rows": functools.partial(instruction_rows, *stage),
        }

    def _stage_keys(self, sample: int) -> torch.Tensor:
        """[kv_heads, L, head_dim] the stage layer's rotated keys of one sample (computed once for the batch)."""
        if self.stage_layer not in self._keys:
            cos, sin = self.stage_kwargs["position_embeddings"]
            self._keys[self.stage_layer] = rotated_keys(self.adapter.layers[self.stage_layer], self.stage_hidden, cos, sin)
        return self._keys[self.stage_layer][1][sample]

    def _final_normed(self) -> torch.Tensor:
        """[B, L, d] the stage layer's output through the language model's final norm (computed once)."""
        if self._final is None:
            self._final = self.adapter.language_model.norm(self.next_hidden)
        return self._final

    def _probabilities(self, layer_index: int, hidden, kwargs, rows: torch.Tensor | slice, sample: int | None = None) -> torch.Tensor:
        """attention_probabilities at a layer for query `rows` ([B or 1, R], or a slice): of every sample, or of one."""
        cos, sin = kwargs["position_embeddings"]
        layer = self.adapter.layers[layer_index]
        if layer_index not in self._keys:
            self._keys[layer_index] = rotated_keys(layer, hidden, cos, sin)
        normed, keys = self._keys[layer_index]
        key_valid = self.key_valid
        if sample is not None:
            one = slice(sample, sample + 1)
            pick = one if cos.shape[0] > 1 else slice(0, 1)
            normed, keys, cos, sin, key_valid = normed[one], keys[one], cos[pick], sin[pick], key_valid[one]
        return attention_probabilities(layer, normed, keys, cos, sin, rows, key_valid)
