"""Loading a VLM and its processor for evaluation or training: a hub id or a local folder, with a clear error
when it cannot be reached."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import transformers

from pruning_zoo.errors import InvalidParameterError, PruningZooError


@dataclasses.dataclass
class LoadedVLM:
    """A model and its processor, loaded once and shared by every cell of a sweep. Not an nn.Module itself,
    so lmms-eval's `lmms.clean()` (which deletes module attributes after each evaluation) leaves it alone."""

    name: str
    model: torch.nn.Module
    processor: Any
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on a CPU (where bfloat16 matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise InvalidParameterError(f"dtype {dtype!r} is not one of auto, {', '.join(choices)}")
    return choices[dtype]


def load_vlm(pretrained: str, device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None) -> LoadedVLM:
    """A VLM and its processor from a hub id or a local folder, in eval mode on `device`."""
    from pruning_zoo.adapters import adapter_for

    target = torch.device(device or default_device())
    if target.type == "cuda" and not torch.cuda.is_available():
        raise PruningZooError(f"device {target} was asked for but no CUDA device is visible; use --device cpu")
    options = {"dtype": resolve_dtype(dtype, target)}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(pretrained, **options)
        processor = transformers.AutoProcessor.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        where = "folder" if Path(pretrained).exists() else "hub id"
        raise PruningZooError(
            f"cannot load model {pretrained!r} ({where}): {str(error).splitlines()[0].rstrip('.')}. A hub id needs the "
            "Hugging Face hub or its files in the local cache; on a machine without network, download it elsewhere "
            f"(`hf download {pretrained} --local-dir DIR`), copy DIR here and pass --model DIR (or list DIR under "
            "`models:` in the suite file); HF_HUB_OFFLINE=1 makes such lookups fail at once instead of retrying"
        ) from None
    adapter_for(model)  # an unsupported family is a clear error now, not in the middle of a sweep
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
    return LoadedVLM(pretrained, model.to(target).eval(), processor, target)


def chat_prompt(processor, text: str, num_images: int = 1, model_name: str = "this model") -> str:
    """The model's own chat template around `num_images` images and `text`, images first (as LLaVA trains);
    text that already holds the image token places the images itself."""
    if getattr(processor, "chat_template", None) is None:
        raise PruningZooError(
            f"{model_name} has a processor without a chat template; save one with the processor "
            "(processor.chat_template = ...; processor.save_pretrained(DIR))"
        )
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in text:
        content = [{"type": "text", "text": text}]
    else:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
