"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution crops plus image-newline tokens.

An image's visual tokens are the base crop's grid followed by the unpadded high-resolution grid with a
newline token closing each row, so they form no single grid; strategies see them as one sequence. The
newline tokens count as visual tokens (as in TransPrune's LLaVA-NeXT setting).
"""

from __future__ import annotations

from pruning_zoo.adapters.base import ModelAdapter


class LlavaNextAdapter(ModelAdapter):
    pass
