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


@dataclasses.dataclass(frozen=True)
class ModelOutline:
    """What a model's config alone tells, without its weights: enough to check a sweep's plans before it runs."""

    name: str
    family: str
    num_layers: int
    #: Visual tokens of every image where the config fixes them, else None.
    visual_tokens: int | None
    #: Blocks of the vision tower, where the config says.
    vision_layers: int | None = None


def model_outline(pretrained: str, given: str | None = None) -> ModelOutline:
    """A model's family, depth and visual tokens per image from its config.json (a local folder, the hub or its
    cache); `given` is the name the user wrote, for messages."""
    from pruning_zoo import plugins

    given = given or pretrained
    try:
        config = transformers.AutoConfig.from_pretrained(pretrained)
    except Exception as error:  # noqa: BLE001 - a broken or unreachable config is reported, whatever raised
        raise InvalidParameterError(f"model {given!r}" + (f" ({pretrained})" if given != pretrained else "")
                                    + ": its config cannot be read "
                                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                                    "; give a folder saved by `save_pretrained` or a hub id") from None
    for entry in plugins.model_families():
        if config.model_type in entry.value.model_types:
            family = entry.value
            break
    else:
        known = [t for entry in plugins.model_families() for t in entry.value.model_types]
        raise InvalidParameterError(f"model {given!r} is a {config.model_type!r} model, which no installed model "
                                    f"family adapts; known model types: {', '.join(known)}")
    text = getattr(config, "text_config", config)
    try:
        tokens = family.visual_tokens(config)
    except (AttributeError, TypeError, ZeroDivisionError):
        tokens = None  # a config the family's rule does not fit: the engine finds each image's count at run time
    vision = getattr(config, "vision_config", None)
    depth = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)
    return ModelOutline(given, family.name, int(text.num_hidden_layers), tokens, depth)


def load_vlm(pretrained: str, device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None) -> LoadedVLM:
    """A VLM and its processor from a hub id or a local folder, in eval mode on `device`."""
    from pruning_zoo.engine.adapters import adapter_for
    from pruning_zoo.inputs import device as checked_device

    target = torch.device(checked_device(device))
    options = {"dtype": resolve_dtype(dtype, target)}
    if attn_implementation:
        options["attn_implementation"] = attn_implementation
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(pretrained, **options)
        processor = transformers.AutoProcessor.from_pretrained(pretrained)
    except Exception as error:  # noqa: BLE001 - a damaged config raises many kinds; each is the same message
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
