"""The architectures the latency benchmark times: real VLM configs (written out: no hub here), built with random
weights directly on the device, and prompts of uniform batches around one image (latency does not depend on
the weights' values or the tokens')."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
import transformers
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from pruning_zoo.errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A VLM architecture to time: its config, and a prompt of `text` tokens around one image."""

    name: str
    description: str
    config: Callable[[], transformers.PretrainedConfig]
    #: Builds uniform inputs (one image per sample, same positions) for a model of this architecture.
    prompt: Callable[[torch.nn.Module, int, torch.Generator], dict]
    num_visual: int


def _random_text(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=generator)


def llava_prompt(text_before: int, text_after: int) -> Callable:
    """BOS, text, the image's placeholders (one per visual token), text."""

    def build(model, batch: int, generator: torch.Generator) -> dict:
        config = model.config
        vision = config.vision_config
        visual = (vision.image_size // vision.patch_size) ** 2
        image = config.image_token_id
        vocab = min(image, config.get_text_config().vocab_size)
        ids = torch.cat([
            torch.full((batch, 1), config.get_text_config().bos_token_id or 1),
            _random_text(generator, batch, text_before, vocab),
            torch.full((batch, visual), image),
            _random_text(generator, batch, text_after, vocab),
        ], dim=1)
        pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels}

    return build


def qwen2_vl_prompt(text_before: int, text_after: int, grid: tuple[int, int]) -> Callable:
    """Text, <|vision_start|>, the image's merged-patch placeholders for a (rows, cols) patch grid,
    <|vision_end|>, text; mm_token_type_ids where this transformers version asks for them."""

    def build(model, batch: int, generator: torch.Generator) -> dict:
        config = model.config
        vision = config.vision_config
        rows, cols = grid
        visual = rows * cols // vision.spatial_merge_size**2
        vocab = min(config.vision_start_token_id, config.get_text_config().vocab_size)
        parts = [
            _random_text(generator, batch, text_before, vocab),
            torch.full((batch, 1), config.vision_start_token_id),
            torch.full((batch, visual), config.image_token_id),
            torch.full((batch, 1), config.vision_end_token_id),
            _random_text(generator, batch, text_after, vocab),
        ]
        ids = torch.cat(parts, dim=1)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        inputs = {
            "input_ids": ids,
            "pixel_values": torch.randn(batch * rows * cols, patch, generator=generator),
            "image_grid_thw": torch.tensor([[1, rows, cols]] * batch),
        }
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
        return inputs

    return build


def llava_next_prompt(text_before: int, text_after: int, image_size: tuple[int, int]) -> Callable:
    """BOS, text, the image's packed tokens (base crop, unpadded any-resolution grid, a newline closing each
    row: counted by the model's own packing), text; one image of `image_size` (height, width) per sample."""

    def build(model, batch: int, generator: torch.Generator) -> dict:
        config = model.config
        vision = config.vision_config
        crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, vision.image_size)
        per_crop = (vision.image_size // vision.patch_size) ** 2
        packed, _ = model.model.pack_image_features(
            [torch.zeros(crops, per_crop, 1)], torch.tensor([list(image_size)]), config.vision_feature_select_strategy,
            image_newline=torch.zeros(1),
        )
        vocab = min(config.image_token_id, config.get_text_config().vocab_size)
        ids = torch.cat([
            torch.full((batch, 1), config.get_text_config().bos_token_id or 1),
            _random_text(generator, batch, text_before, vocab),
            torch.full((batch, packed[0].shape[0]), config.image_token_id),
            _random_text(generator, batch, text_after, vocab),
        ], dim=1)
        pixels = torch.randn(batch, crops, 3, vision.image_size, vision.image_size, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor([list(image_size)] * batch)}

    return build


def llava_1_5_7b_config() -> transformers.LlavaConfig:
    """llava-hf/llava-1.5-7b-hf's config.json, written out (no hub here)."""
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001,
            bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
    )


def llava_next_7b_config() -> transformers.LlavaNextConfig:
    """llava-hf/llava-v1.6-vicuna-7b-hf's shapes: LLaVA-1.5-7B's CLIP tower and Vicuna-7B, with LLaVA-NeXT's
    any-resolution grid (transformers' defaults: pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008)."""
    llava = llava_1_5_7b_config()
    return transformers.LlavaNextConfig(
        vision_config=llava.vision_config, text_config=llava.text_config, image_token_index=32000,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], image_seq_length=576,
    )


def qwen2_vl_7b_config() -> transformers.Qwen2VLConfig:
    """Qwen/Qwen2-VL-7B-Instruct's config.json, written out (no hub here)."""
    return transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=151643,
            eos_token_id=151645, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


#: 576 visual tokens and 640 in all, as LLaVA-1.5 at 336 px with a short question; Qwen2-VL gets a
#: 672 x 672 image (48 x 48 patches, 576 merged tokens) so both start from the same count; LLaVA-NeXT gets the
#: same image, which its any-resolution crops turn into 2928 tokens.
ARCHITECTURES = {
    "llava-1.5-7b": Architecture("llava-1.5-7b", "LLaVA-1.5-7B: CLIP ViT-L/14-336, MLP projector, Vicuna-7B",
                                 llava_1_5_7b_config, llava_prompt(35, 28), 576),
    "llava-next-7b": Architecture("llava-next-7b", "LLaVA-NeXT-7B (v1.6 Vicuna): CLIP ViT-L/14-336 on a 672 x 672 image "
                                  "(4 crops + base: 2928 packed tokens with newlines), Vicuna-7B",
                                  llava_next_7b_config, llava_next_prompt(35, 28, (672, 672)), 2928),
    "qwen2-vl-7b": Architecture("qwen2-vl-7b", "Qwen2-VL-7B: 675M ViT at 672 px (576 merged tokens), Qwen2-7B",
                                qwen2_vl_7b_config, qwen2_vl_prompt(31, 31, (48, 48)), 576),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise UnknownNameError("architecture", name, ARCHITECTURES)
    return ARCHITECTURES[name]


def build_random(arch: Architecture, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The architecture with random weights, built on `device` itself (seconds for 7B: nothing is copied)."""
    config = arch.config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


__all__ = ["ARCHITECTURES", "Architecture", "architecture", "build_random", "llava_next_prompt", "llava_prompt",
           "qwen2_vl_prompt"]
