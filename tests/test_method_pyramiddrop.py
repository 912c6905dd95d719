"""PyramidDrop: the schedule and how budgets and depths map to it, the rank-and-drop rule on hand-made attention,
against the eager attention of the layer after each drop on every family, and cached generation."""

from __future__ import annotations

import pytest
import torch
from test_methods import Recording as SelectionRecording
from test_methods import eager_outputs

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage


def test_pyramiddrop_schedule_is_the_codes_on_llava_1_5():
    """After layers 8, 16, 24 (1-indexed) keep floor(576 * 0.5, 0.25, 0.125) = 288, 144, 72."""
    pdrop = pruning_zoo.get_strategy("pyramiddrop")
    assert pdrop.params.positions == "renumber"
    assert pdrop.plan(72, 576, 32) == (Stage(7, 288), Stage(15, 144), Stage(23, 72))
    assert pdrop.average([8, 16, 24], [288, 144, 72], 576, 32) == 270.0
    # Other budgets scale the ratios together; the budget is the count after the last drop.
    assert pdrop.plan(64, 576, 32) == (Stage(7, 256), Stage(15, 128), Stage(23, 64))
    assert pdrop.plan(192, 576, 32) == (Stage(15, 384), Stage(23, 192))  # the first would keep all 576
    assert pdrop.plan(576, 576, 32) == ()
    # A per-layer average: 270 is the code's schedule; one below what the first 8 layers allow is refused.
    average = pruning_zoo.get_strategy("pyramiddrop", budget_counts="per_layer_average")
    assert average.plan(270, 576, 32) == (Stage(7, 288), Stage(15, 144), Stage(23, 72))
    with pytest.raises(pruning_zoo.InvalidParameterError, match="lowest reachable average is 144.8"):
        average.plan(64, 576, 32)


def test_pyramiddrop_scales_the_layers_to_other_depths():
    pdrop = pruning_zoo.get_strategy("pyramiddrop")
    assert pdrop.layers(32) == [8, 16, 24] and pdrop.layers(28) == [7, 14, 21] and pdrop.layers(4) == [1, 2, 3]
    assert pdrop.plan(1, 16, 4) == (Stage(0, 4), Stage(1, 2), Stage(2, 1))
    assert pdrop.plan(8, 16, 4) == (Stage(2, 8),)  # the earlier drops would keep every token, and are left out
    with pytest.raises(pruning_zoo.InvalidParameterError, match="does not fit a model of 3 decoder layers"):
        pdrop.plan(4, 16, 3)


def test_pyramiddrop_parameters_are_checked():
    for bad in ({"layer_list": (8, 16), "keep_ratios": (0.5,)}, {"layer_list": (16, 8), "keep_ratios": (0.5, 0.25)},
                {"layer_list": (8,), "keep_ratios": (1.5,)}, {"keep_ratios": (0.25, 0.5, 0.125)},
                {"layer_list": (0, 16, 24)}, {"attention": "mean"}):
        with pytest.raises(pruning_zoo.InvalidParameterError):
            pruning_zoo.get_strategy("pyramiddrop", **bad)


def test_pyramiddrop_keeps_the_top_head_mean_attention_of_the_last_token_in_order():
    """Two heads on five tokens: the head means are .25, .05, .30, .20, .20 (a tie between 3 and 4: the first wins),
    so keeping 3 keeps tokens 0, 2, 3; 'stage_layer' reads the stage layer's own row instead."""
    rows = torch.tensor([[0.4, 0.0, 0.2, 0.2, 0.2], [0.1, 0.1, 0.4, 0.2, 0.2]])
    own = torch.tensor([[0.0, 1.0, 0.0, 0.5, 0.0]] * 2)
    ctx = ScoreContext(stage=Stage(after_layer=7, keep=3), tokens=torch.zeros(5, 2), num_layers=32,
                       observations={"next_layer_last_token_attention": lambda: rows, "last_token_attention": lambda: own})
    pdrop = pruning_zoo.get_strategy("pyramiddrop")
    assert [s.keep.tolist() for s in pdrop.select_images([ctx, ctx])] == [[0, 2, 3], [0, 2, 3]]
    torch.testing.assert_close(pdrop.score(ctx), torch.tensor([0.25, 0.05, 0.30, 0.20, 0.20]))
    stage_layer = pruning_zoo.get_strategy("pyramiddrop", attention="stage_layer")
    assert stage_layer.select_images([ctx])[0].keep.tolist() == [0, 1, 3]


def test_pyramiddrop_ranks_by_the_eager_attention_of_the_layer_after_the_drop(family_model):
    """The first drop (after 0-indexed layer 0 at budget 1 on 4 layers) ranks by layer 1's attention of the last
    prompt token onto the image, head mean, in the unpruned model: the layers up to the drop saw every token."""
    family, model = family_model
    inputs = family.inputs(3)
    recording = SelectionRecording(pruning_zoo.get_strategy("pyramiddrop"))
    with torch.no_grad(), prune(model, recording.strategy, 1) as run:
        model(**inputs)
    attentions = eager_outputs(model, inputs, output_attentions=True).attentions
    image = inputs["input_ids"] == model.config.image_token_id
    first = [(stage, selection) for stage, selection in recording.selections if stage.after_layer == 0]
    assert len(first) == 3 and len(recording.selections) == 9  # three drops per image
    for sample, (stage, selection) in enumerate(first):
        scores = attentions[1][sample, :, -1, image[sample]].float().mean(0)
        assert torch.equal(selection.keep, torch.topk(scores, stage.keep).indices.sort().values)
    for image_record in run.records[0].images:
        n = image_record.num_visual
        stages = recording.strategy.plan(1, n, 4)
        assert image_record.kept_per_layer == [n] + [stage.keep for stage in stages] and stages[-1].keep == 1
