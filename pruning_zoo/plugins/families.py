"""What a model-family plugin registers: the transformers VLM class it hooks and the adapter that does it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A family of VLMs sharing one transformers model class and so one adapter."""

    #: Registry name used by suites and `--family`.
    name: str
    #: `config.model_type` values of checkpoints in this family.
    model_types: tuple[str, ...]
    #: The transformers class users load with `from_pretrained`.
    model_class: str
    description: str
    #: Builds the family's adapter around a loaded model (a ModelAdapter subclass; None: the generic one).
    adapter: type | None = None
    #: Visual tokens of every image, from the model's config, where its resolution is fixed; None where each image
    #: has its own count (any-resolution crops, native resolution). A dry run checks budgets against it.
    visual_tokens: Callable[[Any], int | None] = lambda config: None
