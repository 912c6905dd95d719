"""A Llama-layout decoder layer run with its q/k/v projections fused into one matrix multiplication, and its gate
and up projections into another, as serving engines run them (the compiled mode of the latency benchmark).

At a few hundred tokens a 7B layer's 4096-wide projections fill too few of an H100's SMs; one 12288-wide (q, k, v)
and one 22016-wide (gate, up) product keep more of them busy. The math is the layer's own: RMSNorm, rotary
tables, causal SDPA, SiLU-gated MLP, in the same order (tests compare it with the unmodified layer). The fused
weights are copies, made once per model; the model itself is not changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pruning_zoo.errors import PruningZooError
from pruning_zoo.observe import rotate_half


class FusedLayer:
    """One decoder layer's forward with fused projections; `record` (a dict) receives the sub-block tensors
    the engine's `sublayer_io` observation offers (attn_in, attn_out, mlp_in, mlp_out)."""

    def __init__(self, layer: nn.Module):
        attention, mlp = layer.self_attn, layer.mlp
        needed = [(attention, "q_proj"), (attention, "k_proj"), (attention, "v_proj"), (attention, "o_proj"),
                  (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj"), (mlp, "act_fn")]
        missing = [name for module, name in needed if not hasattr(module, name)]
        if missing:
            raise PruningZooError(f"{type(layer).__name__} has no {', '.join(missing)}: fused projections need the "
                                  "Llama layout (q/k/v/o_proj; gate/up/down_proj)")
        self.layer = layer
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        self.splits = [p.out_features for p in projections]
        with torch.no_grad():
            self.qkv_weight = torch.cat([p.weight for p in projections])
            biases = [p.bias for p in projections]
            self.qkv_bias = None if biases[0] is None else torch.cat(biases)
            self.gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            has_bias = mlp.gate_proj.bias is not None
            self.gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]) if has_bias else None

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer_index: int,
                 record: dict | None = None) -> torch.Tensor:
        layer = self.layer
        batch, length, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        q, k, v = F.linear(normed, self.qkv_weight, self.qkv_bias).split(self.splits, dim=-1)
        q, k, v = (x.view(batch, length, -1, self.head_dim).transpose(1, 2) for x in (q, k, v))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, layer_index)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        attention_out = layer.self_attn.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
        hidden = hidden + attention_out
        mlp_in = layer.post_attention_layernorm(hidden)
        gate, up = F.linear(mlp_in, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        mlp_out = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        if record is not None:
            record.update(attn_in=normed, attn_out=attention_out, mlp_in=mlp_in, mlp_out=mlp_out)
        return hidden + mlp_out


def fuse_layers(layers: nn.ModuleList) -> list[FusedLayer]:
    return [FusedLayer(layer) for layer in layers]
