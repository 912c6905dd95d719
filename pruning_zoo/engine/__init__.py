"""The engine: hooks a strategy into an unmodified transformers VLM for the length of a `with prune(...)` block.

`run` applies the strategy's stages; `adapters` (one per model family) and `families` know each model's layout;
`observe` computes what strategies observe (attention, keys) under SDPA; `sequence` and `packing` shorten and
fuse the sequence; `flops` and `timing` count what a forward did; `loading` loads checkpoints.

`prune` is imported from `run` when first read, so that loading the model families (`list` does) does not import
transformers.
"""

import importlib

__all__ = ["prune"]


def __getattr__(name: str):
    if name == "prune":
        return importlib.import_module("pruning_zoo.engine.run").prune
    raise AttributeError(f"module 'pruning_zoo.engine' has no attribute {name!r}")
