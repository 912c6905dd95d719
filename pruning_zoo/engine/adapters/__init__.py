"""One adapter per model family; `adapter_for(model)` finds the family of a loaded model."""

from __future__ import annotations

from torch import nn

from pruning_zoo import plugins
from pruning_zoo.engine.adapters.base import ModelAdapter
from pruning_zoo.errors import UnknownNameError

__all__ = ["ModelAdapter", "adapter_for"]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered family's adapter for a loaded VLM, chosen by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for entry in plugins.model_families():
        if model_type in entry.value.model_types:
            return (entry.value.adapter or ModelAdapter)(model)
    known = [t for entry in plugins.model_families() for t in entry.value.model_types]
    raise UnknownNameError(f"model type (of {type(model).__name__})", str(model_type), known)
