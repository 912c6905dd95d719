"""Model families: the transformers VLM classes pruning-zoo knows how to hook, one adapter each."""

from __future__ import annotations

from pruning_zoo.engine.adapters.llava import LlavaAdapter
from pruning_zoo.engine.adapters.llava_next import LlavaNextAdapter
from pruning_zoo.engine.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from pruning_zoo.plugins.families import ModelFamily
from pruning_zoo.plugins.hookspecs import hookimpl


def clip_grid_tokens(config) -> int:
    """LLaVA-1.5: one token per patch of the CLIP grid, plus CLS where the features keep it ('full')."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (getattr(config, "vision_feature_select_strategy", "default") == "full")


LLAVA = ModelFamily(
    name="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    description="LLaVA-1.5: CLIP ViT-L/14-336 (576 patches + CLS), MLP projector, Llama/Vicuna decoder",
    adapter=LlavaAdapter,
    visual_tokens=clip_grid_tokens,
)
LLAVA_NEXT = ModelFamily(
    name="llava_next",
    model_types=("llava_next",),
    model_class="LlavaNextForConditionalGeneration",
    description="LLaVA-NeXT: any-resolution crops of a CLIP tower, with image-newline tokens",
    adapter=LlavaNextAdapter,
)
QWEN2_VL = ModelFamily(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    description="Qwen2-VL: native-resolution ViT, 2x2 merged patches, no CLS, 3-D M-RoPE positions",
    adapter=Qwen2VLAdapter,
)
QWEN2_5_VL = ModelFamily(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    description="Qwen2.5-VL: windowed-attention ViT, 2x2 merged patches, no CLS, 3-D M-RoPE positions",
    adapter=Qwen2_5_VLAdapter,
)


@hookimpl
def register_model_families(register):
    for family in (LLAVA, LLAVA_NEXT, QWEN2_VL, QWEN2_5_VL):
        register(family)
