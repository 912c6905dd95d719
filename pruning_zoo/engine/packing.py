"""Linear layers that read one input, multiplied as one matrix: what serving engines do with a layer's q/k/v
projections and its MLP's gate/up (vLLM's QKVParallelLinear and MergedColumnParallelLinear).

A pruned prompt leaves few rows: at 128, LLaVA-1.5-7B's three 4096 x 4096 projections are three small matrix
multiplications that each underfill an H100 (15 us each, 2.2 TB/s of weights read; one 12288-wide one takes
40 us, scripts/profile_prefill.py), and each is a kernel launch. Packing gives one.

The group's weights are copied once into one matrix and each layer's parameters become views of their rows
(a later packing of the same layers finds them so and copies nothing):
their values, their Parameter objects and the memory they take are unchanged, so the modules' own forwards and
everything else reading them (the attention probe, the eager engine) see the same model. Only the forwards
shadowed by `forwards()` multiply by the packed matrix: the first member called computes every member's
output; each later member, called on the same input, takes its part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pruning_zoo.errors import PruningZooError


class PackedProjections:
    def __init__(self, linears: Sequence[nn.Linear]):
        linears = list(linears)
        first = linears[0]
        if len(linears) < 2 or any(
            type(linear) is not nn.Linear
            or linear.in_features != first.in_features
            or linear.weight.dtype != first.weight.dtype
            or linear.weight.device != first.weight.device
            or (linear.bias is None) != (first.bias is None)
            for linear in linears
        ):
            raise PruningZooError("projections are packed in groups of two or more nn.Linear of one input width, dtype, "
                                  f"device and bias; got {[type(linear).__name__ for linear in linears]}")
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self.weight = self._pack([linear.weight for linear in linears])
        self.bias = None if first.bias is None else self._pack([linear.bias for linear in linears])
        #: Outputs computed for the input `_input` and not yet taken, by member index.
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def _pack(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        if consecutive(parameters):  # packed already (by an earlier prefill): one view over them, no copy
            first = parameters[0].detach()
            return first.as_strided((sum(self.sizes), *first.shape[1:]), first.stride(), first.storage_offset())
        with torch.no_grad():
            packed = torch.cat([parameter.detach() for parameter in parameters])
            for parameter, rows in zip(parameters, packed.split(self.sizes)):
                parameter.data = rows  # a view: the old storage is freed, the values stay
        return packed

    def forwards(self) -> dict[nn.Module, Callable]:
        """The members' shadow forwards (for `segmented.shadowed_forwards`)."""
        return {linear: self._forward_of(index) for index, linear in enumerate(self.linears)}

    def _forward_of(self, index: int) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self._input is not x or index not in self._pending:
                outputs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
                self._input, self._pending = x, dict(enumerate(outputs))
            output = self._pending.pop(index)
            if not self._pending:
                self._input = None  # nothing kept alive between calls
            return output

        return forward


def consecutive(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether contiguous tensors follow one another in one storage (a packed matrix's rows)."""
    return all(t.is_contiguous() for t in tensors) and all(
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and b.storage_offset() == a.storage_offset() + a.numel()
        for a, b in zip(tensors, tensors[1:]))


def own_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` by the layer's own weights, whatever forward shadows it: for code that calls one member of a
    group alone (the attention probe's keys), which a packed forward would compute every member for."""
    return F.linear(x, linear.weight, linear.bias)


def shared_input_linears(block: nn.Module) -> list[list[nn.Linear]]:
    """A transformer block's linear layers that read one input: its attention's q/k/v projections (`self_attn`
    or `attn`) and its MLP's gate/up projections, where it has them as separate nn.Linear layers."""
    attention = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    groups = [[getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")],
              [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")]]
    return [group for group in groups if all(type(linear) is nn.Linear for linear in group)]
