"""The testbed's reference VLM: an ordinary `LlavaForConditionalGeneration` (a CLIP-style tower at 336 px,
patch 14: 576 patch tokens plus CLS; LLaVA's MLP projector; a small Llama decoder) with its own word-level
tokenizer and processor, saved with `save_pretrained` so it loads like a hub model."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from pruning_zoo.testbed.questions import vocabulary
from pruning_zoo.testbed.scenes import SIZE

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
CHAT_WORDS = ["user", "assistant", ":"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{% endif %} </s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def prompt(question: str) -> str:
    """The prompt the processor and the chat template give for one image and one question."""
    return f"USER: <image> {question} ASSISTANT:"


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the testbed's words (lower-cased, punctuation split off)."""
    words = SPECIAL + CHAT_WORDS + vocabulary()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=1024,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer=None) -> transformers.LlavaProcessor:
    tokenizer = tokenizer or build_tokenizer()
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer) -> transformers.LlavaConfig:
    """About 8M parameters: small enough to commit (fp32 safetensors under 48 MiB) and train in minutes."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6, image_size=SIZE,
        patch_size=14, projection_dim=192,
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
        projector_hidden_act="gelu",
    )


def pixel_values(images) -> torch.Tensor:
    """What the processor's CLIP image processor gives for 336x336 RGB images (no resize or crop needed)."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
