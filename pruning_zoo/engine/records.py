"""What a pruned forward records: per image the tokens kept in each decoder layer and which ones, per sample the
tokens each layer processed (from which its FLOPs follow)."""

from __future__ import annotations

import dataclasses

from pruning_zoo.engine.flops import Convention, DecoderShape, llm_flops

__all__ = ["ForwardRecord", "ImageRecord"]


@dataclasses.dataclass
class ImageRecord:
    """The budget one image achieved in one forward."""

    sample: int
    num_visual: int
    #: Visual tokens of this image in each decoder layer.
    kept_per_layer: list[int]
    #: Multiply-accumulates of the vision tower and projector for this image (the flops.py convention).
    vision_flops: int
    #: For each slot still present after the last stage, the index (into the image's original visual tokens) of the
    #: token it holds, or None for a token that is no patch (VisionZip's CLS, placed in a free slot). For a merge
    #: (pool, VisionZip's contextual tokens) a slot holds merged features, not only its own.
    slots: list[int | None] = dataclasses.field(default_factory=list)
    #: Merge units (visual tokens) of this image entering each vision block, where a stage inside the vision tower
    #: (ToMe) merged some; empty where the tower ran on every token. After such a stage a slot holds its merge
    #: group's features, and the group's kept unit is the token recorded in `slots`.
    vision_units: list[int] = dataclasses.field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        """The original visual tokens still present (what evidence recall reads)."""
        return [index for index in self.slots if index is not None]

    @property
    def non_patch_tokens(self) -> int:
        """Kept tokens that are no patch of the image (VisionZip's CLS)."""
        return sum(index is None for index in self.slots)

    @property
    def entering_llm(self) -> int:
        return self.kept_per_layer[0]

    @property
    def average_per_layer(self) -> float:
        return sum(self.kept_per_layer) / len(self.kept_per_layer)


@dataclasses.dataclass
class ForwardRecord:
    """What one prefill forward computed: per image budgets and, per sample, tokens in each layer."""

    images: list[ImageRecord]
    #: Per sample, the non-padding tokens (text and visual) each decoder layer processed.
    tokens_per_layer: list[list[int]]
    decoder: DecoderShape

    def llm_flops(self, convention: Convention) -> list[int]:
        """Per sample, the decoder layers' FLOPs for this forward, from the tokens each layer processed."""
        return [llm_flops(tokens, self.decoder, convention) for tokens in self.tokens_per_layer]

    def vision_flops(self) -> list[int]:
        """Per sample, the vision tower's and projector's FLOPs for its images."""
        totals = [0] * len(self.tokens_per_layer)
        for image in self.images:
            totals[image.sample] += image.vision_flops
        return totals
