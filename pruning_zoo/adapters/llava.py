"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one CLIP crop per image, a square patch grid."""

from __future__ import annotations

import math

from pruning_zoo.adapters.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    def image_grids(self, counts):
        # CLIP's patches without CLS, row-major: a square grid.
        return [(side, side) if (side := math.isqrt(n)) ** 2 == n else None for n in counts]
