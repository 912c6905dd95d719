"""FLOPs: our conventions against METHODS.md's published anchors and against torch's FlopCounterMode."""

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import pruning_zoo
from pruning_zoo.engine.flops import DecoderShape, clip_vision_flops, llm_flops, projector_flops
from pruning_zoo.engine.run import prune

LLAVA_7B = DecoderShape(hidden=4096, intermediate=11008, layers=32)


def test_published_anchors_for_llava_1_5_7b():
    assert llm_flops([576] * 32, LLAVA_7B, "2ndm") / 1e12 == pytest.approx(2.99, abs=0.005)
    assert llm_flops([576] * 32, LLAVA_7B, "3ndm") / 1e12 == pytest.approx(3.82, abs=0.005)


@pytest.mark.parametrize("drop_ratio, share", [(0.5, 0.524), (0.75, 0.292)])
def test_fastv_k2_shares_of_full_llm_flops(drop_ratio, share):
    """FastV K=2 on the 576 image tokens only, the kept count from the shared FastV plan (METHODS.md)."""
    fastv = pruning_zoo.get_strategy("fastv", k=2, budget_counts="per_layer_average")
    kept = round(576 * (1 - drop_ratio))
    average = (2 * 576 + 30 * kept) / 32
    assert average == int(average)
    (stage,) = fastv.plan(int(average), 576, 32)
    assert stage.keep == kept
    per_layer = [576] * (stage.after_layer + 1) + [stage.keep] * (31 - stage.after_layer)
    full = llm_flops([576] * 32, LLAVA_7B, "2ndm")
    assert llm_flops(per_layer, LLAVA_7B, "2ndm") / full == pytest.approx(share, abs=0.0005)


def _decoder_flops_counted_by_torch(model, inputs, strategy, budget):
    """FlopCounterMode's count inside the decoder layers only (2 FLOPs per multiply-accumulate)."""
    with torch.no_grad(), prune(model, strategy, budget) as run:
        with FlopCounterMode(display=False) as counter:
            model(**inputs)
    per_module = counter.get_flop_counts()
    # A layer's own work is its attention and MLP; a stage's selection work runs in the layer's pre-hook.
    parts = [name for name in per_module if "language_model.layers." in name and name.endswith((".self_attn", ".mlp"))]
    assert len(parts) == 2 * model.config.text_config.num_hidden_layers
    return sum(sum(per_module[name].values()) for name in parts), run.records[-1]


@pytest.mark.parametrize("strategy, budget", [("none", 1.0), ("random", 4), ("fastv", 0.75)])
def test_llm_flops_match_flop_counter_mode(strategy, budget):
    """Tiny LLaVA without grouped-query attention, eager attention (so every matmul is visible), batch 1."""
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    import tiny_models

    config = tiny_models.llava_config()
    config.text_config = text
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    inputs = tiny_models.llava_inputs(1)
    counted, record = _decoder_flops_counted_by_torch(model, inputs, pruning_zoo.get_strategy(strategy), budget)
    ours = llm_flops(record.tokens_per_layer[0], DecoderShape.from_config(text), "3ndm")
    # Rotary, norms and softmax are elementwise: neither count includes them.
    assert counted == 2 * ours


def test_vision_and_projector_flops_match_flop_counter_mode():
    import tiny_models

    torch.manual_seed(0)
    config = tiny_models.llava_config()
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    pixel_values = tiny_models.llava_inputs(2)["pixel_values"]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(pixel_values=pixel_values)
    per_module = counter.get_flop_counts()
    vision = config.vision_config
    tower, projector = per_module["CLIPVisionModel"], per_module["LlavaMultiModalProjector"]
    assert sum(tower.values()) == 2 * clip_vision_flops(2, vision.image_size, vision.patch_size, vision.hidden_size,
                                                         vision.intermediate_size, vision.num_hidden_layers)
    assert sum(projector.values()) == 2 * projector_flops(2 * 16, vision.hidden_size, config.text_config.hidden_size)


def _vision_call(model, family_name, inputs):
    """The model's own vision encoding (tower and projector) for these inputs."""
    if family_name == "llava":
        return lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"])
    if family_name == "llava_next":
        return lambda: model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    return lambda: model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])


def test_vision_flops_in_every_forward_record_match_flop_counter_mode(family_model):
    """Each image's vision FLOPs in the record (tower, projector or merger; any-resolution crops; Qwen's
    attention segments and windows) sum to exactly half of FlopCounterMode's count of the model's own vision
    encoding of the batch; samples' LLM FLOPs come from their per-layer token counts."""
    family, model = family_model
    inputs = family.inputs(3)
    with torch.no_grad():
        with prune(model, pruning_zoo.get_strategy("random"), 3) as run:
            model(**inputs)
        # FlopCounterMode has no formula for CPU SDPA kernels: count the eager attention's matmuls instead.
        model.set_attn_implementation("eager")
        try:
            with FlopCounterMode(display=False) as counter:
                _vision_call(model, family.name, inputs)()
        finally:
            model.set_attn_implementation("sdpa")
    (record,) = run.records
    assert sum(image.vision_flops for image in record.images) * 2 == counter.get_total_flops()
    assert sum(record.vision_flops()) == sum(image.vision_flops for image in record.images)
    shape = DecoderShape.from_config(model.config.get_text_config())
    assert record.llm_flops("3ndm") == [llm_flops(tokens, shape, "3ndm") for tokens in record.tokens_per_layer]
    # Images of different sizes cost different vision FLOPs where the family allows different sizes.
    if family.name != "llava":
        assert len({image.vision_flops for image in record.images}) == 2
