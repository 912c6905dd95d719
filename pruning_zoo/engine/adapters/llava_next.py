"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution crops plus image-newline tokens.

An image's visual tokens are the base crop's grid followed by the unpadded high-resolution grid with a
newline token closing each row, so they form no single grid; strategies see them as one sequence. The
newline tokens count as visual tokens (as in TransPrune's LLaVA-NeXT setting). For vision observations a
newline token carries no CLS attention and the keys and features of the patch it follows.
"""

from __future__ import annotations

import torch

from pruning_zoo.engine.adapters.base import MethodWatch, ModelAdapter, stack_image_features
from pruning_zoo.engine.adapters.clip import TokenSources
from pruning_zoo.engine.adapters.llava import LlavaAdapter, clip_vision_tower_flops

NEWLINE = -1.0


def crops_of(image_size, config) -> int:
    """Crops LLaVA-NeXT splits an image of `image_size` into (base crop included), by the model's own rule."""
    # Imported here: transformers' modeling modules take a second to import, and `pruning-zoo list` loads
    # every family's adapter.
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA's CLIP tower and projector, with crops per image and packed tokens of its own."""

    def __init__(self, model):
        super().__init__(model)
        self._image_sizes: torch.Tensor | None = None
        #: Token sources by (image sizes, image, tokens, device), on the model's device: made once, so that observing
        #: copies nothing from the host (a copy is a wait a CUDA graph cannot hold).
        self._sources: dict[tuple, TokenSources] = {}

    @property
    def vision_stage_depth(self):
        """No stage inside the tower: a merge group's patches may be cropped away by the unpadding, so one token per
        group before the LLM would not be an exact count."""
        return None

    def vision_stage_hooks(self, stages):
        return []

    def image_grids(self, counts):
        return ModelAdapter.image_grids(self, counts)  # base crop + unpadded grid + newlines: no single grid

    def vision_hooks(self, observed):
        # generate() may encode the images itself, before the model's forward: watch the encoding call.
        def record_sizes(arguments):
            self._image_sizes = arguments.get("image_sizes")

        return [MethodWatch(self.model.model, "get_image_features", record_sizes), *super().vision_hooks(observed)]

    def capturable_vision_inputs(self, vision_inputs):
        """transformers reads LLaVA-NeXT's `image_sizes` on the host (`.tolist()`, to count each image's crops
        and unpad its grid), and so does `_crops`: from a GPU tensor, a wait for the GPU that a CUDA graph cannot
        hold (an H100 run at 71142b3 left the tower and VisionZip's and LearnPruner's selections eager for it). A
        host copy, made once, serves them; nothing reads the sizes on the device. transformers' packing then makes
        `feature_lens` on the GPU from a host list (a copy, another wait; e1f8e41 still ran the tower eagerly for
        it): where every image has one size, the packing is precomputed as an index map (`packed_rows`) and
        `image_features` applies it on the device."""
        sizes = vision_inputs.get("image_sizes")
        if not isinstance(sizes, torch.Tensor):
            return vision_inputs
        capturable = {**vision_inputs, "image_sizes": sizes.cpu()}
        pixels = vision_inputs.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and pixels.dim() == 5 and len({tuple(s) for s in sizes.tolist()}) == 1:
            capturable["packed_rows"] = self._packed_rows(capturable["image_sizes"][:1]).to(pixels.device)
        return capturable

    def image_features(self, vision_inputs):
        """The packed tokens (base crop, unpadded grid, newlines) of images of one size, [images, n, d]."""
        if "packed_rows" in vision_inputs:
            return self._packed_image_features(vision_inputs)
        config = self.model.config
        return stack_image_features(self.model.model.get_image_features(
            pixel_values=vision_inputs["pixel_values"], image_sizes=vision_inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ))

    def _packed_image_features(self, vision_inputs) -> torch.Tensor:
        """What `get_image_features` gives images of one size (tower, feature layer, projector, packing), packed by
        the precomputed `packed_rows`: nothing read on the host. The segmented prefill checks it against the
        model's own forward on its first run."""
        config, model = self.model.config, self.model.model
        sizes, rows, pixels = vision_inputs["image_sizes"], vision_inputs["packed_rows"], vision_inputs["pixel_values"]
        self._image_sizes = sizes  # as the vision hooks record it from get_image_features
        crops = crops_of(sizes[0], config)
        hidden = model.vision_tower(pixels[:, :crops].flatten(0, 1), output_hidden_states=True).hidden_states
        layer = config.vision_feature_layer
        selected = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = model.multi_modal_projector(selected)  # [images * crops, patches, d]
        features = projected.reshape(pixels.shape[0], -1, projected.shape[-1])[:, rows.clamp(min=0)]
        return torch.where((rows < 0)[None, :, None], model.image_newline.to(features.dtype), features)

    def _packed_rows(self, size: torch.Tensor) -> torch.Tensor:
        """Each packed token's row in the features of one image's crops flattened ([crops * patches]), -1 for a
        newline, for an image of `size` ([1, 2], on the host): an index map packed by the model's own
        `pack_image_features` (its unpadding and newline rules)."""
        config = self.model.config
        crops = crops_of(size[0], config)
        per_crop = self._features_per_crop
        index = torch.arange(crops * per_crop, dtype=torch.float64).view(crops, per_crop, 1)
        packed, _ = self.model.model.pack_image_features(
            [index], size, config.vision_feature_select_strategy, image_newline=torch.tensor([NEWLINE], dtype=torch.float64))
        return packed[0][:, 0].long()  # NEWLINE is -1

    @property
    def _features_per_crop(self) -> int:
        """Rows of one crop's tower features the projector reads: its patches, and CLS unless it is dropped."""
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1 - self._first_row

    def _crops(self) -> list[int]:
        """Crops per image, as LLaVA-NeXT splits them (base crop first)."""
        config = self.model.config
        return [crops_of(size, config) for size in self._image_sizes.tolist()]

    def token_sources(self, image_index: int, num_visual: int) -> TokenSources:
        """Each packed token's crop and patch (`_packed_rows`), on the model's device, made once per image size."""
        sizes = self._image_sizes.cpu()
        device = self.model.model.image_newline.device
        key = tuple(map(tuple, sizes.tolist())), image_index, num_visual, device
        if key not in self._sources:
            crops = self._crops()
            first_crop = sum(crops[:image_index])
            per_crop = self._features_per_crop
            flat = self._packed_rows(sizes[image_index : image_index + 1])
            synthetic = flat < 0
            # A newline closes a row: it points at the patch before it.
            flat = torch.where(synthetic, torch.cat([flat[:1], flat[:-1]]), flat)
            if flat.numel() != num_visual:
                raise AssertionError(f"packed {flat.numel()} tokens for an image with {num_visual} placeholders")
            feature_row = flat % per_crop
            self._sources[key] = TokenSources(
                crop=(first_crop + flat // per_crop).to(device), row=(feature_row + self._first_row).to(device),
                feature_row=feature_row.to(device), synthetic=synthetic.to(device),
                crops=range(first_crop, first_crop + crops[image_index]))
        return self._sources[key]

    def vision_observations(self, image_index: int, num_visual: int, shared: dict | None = None) -> dict:
        """CLIP observations mapped onto the packed tokens; no `vision_cls_features` (one CLS per crop)."""
        return self._watch.observations(self.token_sources(image_index, num_visual), with_cls_features=False,
                                        shared={} if shared is None else shared)

    def vision_flops(self, image_index: int, num_visual: int, skip_unused: bool = False) -> int:
        crops = self._crops()[image_index]
        per_crop = self._features_per_crop
        return clip_vision_tower_flops(self.model, crops=crops, tokens=crops * per_crop,
                                       skipped=len(self.unused_vision_blocks) if skip_unused else 0)
