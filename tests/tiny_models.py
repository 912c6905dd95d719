"""Tiny random VLMs of every supported family, built from configs, saved and loaded back with from_pretrained,
and prompts for them: left-padded batches whose samples differ in prompt length (and, where the family
allows it, in the number of visual tokens)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import transformers

IMAGE = 32  # placeholder token id of the LLaVA families
QWEN_IMAGE, QWEN_START, QWEN_END, QWEN_VIDEO = 60, 58, 59, 61


def _llama_text(**extra):
    options = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaConfig(**{**options, **extra})


def _clip(image_size: int):
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=32,
    )


def llava_config():
    return transformers.LlavaConfig(
        vision_config=_clip(56), text_config=_llama_text(), image_token_index=IMAGE,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16,
    )


def llava_next_config():
    return transformers.LlavaNextConfig(
        vision_config=_clip(28), text_config=_llama_text(), image_token_index=IMAGE,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=4,
    )


def _qwen_text():
    return dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def qwen2_vl_config():
    return transformers.Qwen2VLConfig(
        text_config=_qwen_text(),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )


def qwen2_5_vl_config():
    return transformers.Qwen2_5_VLConfig(
        text_config=_qwen_text(),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                           fullatt_block_indexes=[1]),
        image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )


def _left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _text(sample: int, length: int) -> list[int]:
    return [3 + (7 * sample + 5 * i) % 25 for i in range(length)]


def llava_inputs(batch_size: int) -> dict:
    rows = [[1] + _text(b, 2) + [IMAGE] * 16 + _text(b + 1, 3 + 2 * b) for b in range(batch_size)]
    ids, mask = _left_pad(rows)
    generator = torch.Generator().manual_seed(batch_size)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(batch_size, 3, 56, 56, generator=generator))


def llava_next_inputs(batch_size: int) -> dict:
    # (28, 56) gives 1x2 crops: 4 + 2*(4+1) = 14 visual tokens; (56, 56) gives 2x2 crops: 4 + 4*(4+1) = 24.
    sizes = [[28, 56], [56, 56]]
    counts = {28: 14, 56: 24}
    image_sizes = torch.tensor([sizes[b % 2] for b in range(batch_size)])
    rows = [[1] + _text(b, 2) + [IMAGE] * counts[int(image_sizes[b, 0])] + _text(b + 1, 3 + b) for b in range(batch_size)]
    ids, mask = _left_pad(rows)
    generator = torch.Generator().manual_seed(batch_size)
    pixel_values = torch.randn(batch_size, 5, 3, 28, 28, generator=generator)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes)


def qwen_inputs(batch_size: int) -> dict:
    # Patch grids 8x8 and 8x12 give 16 and 24 merged visual tokens.
    grids = [[1, 8, 8], [1, 8, 12]]
    image_grid_thw = torch.tensor([grids[b % 2] for b in range(batch_size)])
    tokens = (image_grid_thw.prod(-1) // 4).tolist()
    rows, types = [], []
    for b, count in enumerate(tokens):
        before, after = [1] + _text(b, 2) + [QWEN_START], [QWEN_END] + _text(b + 1, 3 + b)
        rows.append(before + [QWEN_IMAGE] * count + after)
        types.append([0] * len(before) + [1] * count + [0] * len(after))
    ids, mask = _left_pad(rows)
    token_types, _ = _left_pad(types)
    generator = torch.Generator().manual_seed(batch_size)
    pixel_values = torch.randn(int(image_grid_thw.prod(-1).sum()), 3 * 2 * 4 * 4, generator=generator)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                mm_token_type_ids=token_types)


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    name: str
    model_class: type
    config: Callable
    inputs: Callable[[int], dict]

    def build(self, folder) -> torch.nn.Module:
        """Build from the config with seeded random weights, save, and load back like a hub checkpoint."""
        torch.manual_seed(0)
        self.model_class(self.config()).save_pretrained(folder)
        return self.model_class.from_pretrained(folder).eval()


FAMILIES = {
    "llava": TinyFamily("llava", transformers.LlavaForConditionalGeneration, llava_config, llava_inputs),
    "llava_next": TinyFamily("llava_next", transformers.LlavaNextForConditionalGeneration, llava_next_config,
                             llava_next_inputs),
    "qwen2_vl": TinyFamily("qwen2_vl", transformers.Qwen2VLForConditionalGeneration, qwen2_vl_config, qwen_inputs),
    "qwen2_5_vl": TinyFamily("qwen2_5_vl", transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config,
                             qwen_inputs),
}


def testbed_like(folder) -> str:
    """A tiny random LLaVA with the testbed's tokenizer, processor and 336 px / patch 14 geometry (576 visual
    tokens), saved like a hub model: runs the testbed task through lmms-eval in a second."""
    from pruning_zoo.testbed.model import build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=336, patch_size=14),
        text_config=_llama_text(vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
    )
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return str(folder)
