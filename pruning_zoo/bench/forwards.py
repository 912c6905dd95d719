"""How the segmented prefill runs the model's own modules: their forwards shadowed by compiled ones (or skipped,
for blocks nobody reads) while it runs, hooks attached around a block, and the KV cache written once per layer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from pruning_zoo.errors import PruningZooError


class PrefillCache(DynamicCache):
    """The prefill's KV cache, written as serving writes it: each layer's keys and values once, in the cache's
    layout ([batch, heads, tokens, head_dim], contiguous). transformers' DynamicCache appends to an empty tensor
    with torch.cat, a slow strided copy: on an H100 it took 1.2 ms of LLaVA-1.5-7B's 17.5 ms compiled prefill at
    batch 1, and 10 ms of 127 at batch 8 (scripts/profile_prefill.py). Here the layout change is traced into a
    compiled layer, where inductor may fuse it into the kernel that makes the keys. Only the store runs outside
    torch.compile: transformers indexes the cache by each layer's integer `layer_idx`, on which torch.compile
    would specialize, compiling every layer anew."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = key_states.contiguous(), value_states.contiguous()
        self._store(layer_idx, keys, values)
        return keys, values

    @torch.compiler.disable
    def _store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        layer = self.layers[layer_idx]
        if type(layer) is not DynamicLayer or layer.is_initialized:
            raise PruningZooError(f"the segmented prefill writes each layer's KV cache once, into an empty full-attention "
                                  f"layer; layer {layer_idx} is a {type(layer).__name__} already written: use the eager engine")
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values


@contextlib.contextmanager
def shadowed_forwards(forwards: dict[nn.Module, Callable]) -> Iterator[None]:
    """Each module's forward shadowed while the block runs, by its torch.compile'd one (made once: wrapping
    takes about half a millisecond a module) or by `skip_block`: an instance attribute, deleted on exit, so the
    class is untouched and the module's hooks still run eagerly around it. Modules of one class share compiled
    code (torch.compile caches it by the forward's code), recompiled as dynamic after the first shape changes."""
    modules = list(forwards)
    previous = [module.__dict__.get("forward") for module in modules]
    for module, forward in forwards.items():
        module.forward = forward
    try:
        # The layer index reaches the compiled code only as the cache's argument; unspecialized, all layers share
        # it. transformers wraps every layer class's forward in one function, whose compiled versions (per class,
        # batch and first shapes) may pass torch.compile's default limit of 8.
        # The selection segments' code is shared by every strategy, batch and budget of a sweep, each its own
        # compiled version: the limits are raised so that none falls back to running unfused.
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=256,
                                        accumulated_recompile_limit=4096):
            yield
    finally:
        for module, forward in zip(modules, previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def skip_block(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward of a block whose output nothing reads: its input passes through, uncomputed."""
    return hidden_states


@contextlib.contextmanager
def attached(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["PrefillCache", "attached", "shadowed_forwards", "skip_block"]
