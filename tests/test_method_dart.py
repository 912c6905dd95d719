"""DART: the selection rule on hand-made pivots and states, the budget split, against the unpruned model's own keys
and hidden states on every family, and the engine's guarantees (cached generation) for it."""

from __future__ import annotations

import math

import pytest
import torch
from test_methods import Recording as SelectionRecording

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage


def at(*degrees: float) -> torch.Tensor:
    """Unit 2-D states at these angles."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def context(keep: int, image_norms, image_angles, text_norms, text_angles) -> ScoreContext:
    """An image whose stage keys have these L1 norms (one kv head, 1-D keys) and whose final-normed states lie at
    these angles; likewise the rows after it."""
    keys = {"image": torch.tensor(image_norms, dtype=torch.float)[:, None, None],
            "after_image": torch.tensor(text_norms, dtype=torch.float)[:, None, None]}
    states = {"image": at(*image_angles) * 3.0, "after_image": at(*text_angles) * 0.5}  # cosine ignores the scale
    return ScoreContext(stage=Stage(after_layer=1, keep=keep), tokens=torch.zeros(len(image_norms), 2), num_layers=4,
                        observations={"stage_keys": lambda rows="image": -keys[rows],  # the L1 norm is of |k|
                                      "stage_output_final_norm": lambda rows="image": states[rows]})


#: Image tokens 0..7 at these angles; token 3 has the largest key norm (the image pivot), text row 1 (at 0°) the
#: largest of the rows after the image (the text pivot).
IMAGE = dict(image_norms=[1.1, 2, 1.2, 9, 1.3, 1.4, 1.5, 1.6], image_angles=[0, 10, 20, 90, 190, 170, 270, 100])
TEXT = dict(text_norms=[1, 5, 2], text_angles=[45, 0, 135])


def test_dart_takes_for_each_pivot_in_turn_the_least_similar_untaken_tokens():
    """keep 5 = the image pivot 3 + 2 per pivot. Pivot 3 (90°) first: cosines 0°:0, 10°:.17, 20°:.34, 190°:-.17,
    170°:.17, 270°:-1, 100°:.98, so it takes 6 and 4. Then the text pivot (0°) among 0, 1, 2, 5, 7: cosines
    1, .98, .94, -.98, -.17, so it takes 5 and 7. The text pivot itself is no image token and is not kept."""
    dart = pruning_zoo.get_strategy("dart", pivot_image_tokens=1, pivot_text_tokens=1)
    (selection,) = dart.select_images([context(5, **IMAGE, **TEXT)])
    assert selection.keep.tolist() == [3, 4, 5, 6, 7]
    assert torch.topk(dart.score(context(5, **IMAGE, **TEXT)), 5).indices.sort().values.tolist() == [3, 4, 5, 6, 7]


def test_dart_spreads_the_budget_over_the_pivots_first_ones_first():
    """keep 6 = the image pivot + 5 over 2 pivots: the image pivot takes 3 (6, 4, then 0 at cosine 0), the text
    pivot 2 (5, 7). The code's split (floor(B/8) per pivot, plus the image pivots) is this one at B = 8t + 4."""
    dart = pruning_zoo.get_strategy("dart", pivot_image_tokens=1, pivot_text_tokens=1)
    assert dart.select_images([context(6, **IMAGE, **TEXT)])[0].keep.tolist() == [0, 3, 4, 5, 6, 7]
    # Without text pivots the image pivot takes all three, least similar first: 6, 4, 0.
    no_text = pruning_zoo.get_strategy("dart", pivot_image_tokens=1, pivot_text_tokens=0)
    assert no_text.select_images([context(4, **IMAGE, **TEXT)])[0].keep.tolist() == [0, 3, 4, 6]


def test_dart_keeps_exactly_the_budget_and_batches_prompts_of_other_lengths():
    dart = pruning_zoo.get_strategy("dart")  # 4 + 4 pivots; the prompts have 3 and 5 rows after the image
    short = context(7, **IMAGE, **TEXT)
    long = context(7, **IMAGE, text_norms=[1, 5, 2, 3, 4], text_angles=[45, 0, 135, 200, 300])
    other = context(7, image_norms=[9, 1, 1, 1, 2, 3, 4, 1], image_angles=[0, 10, 20, 90, 190, 170, 270, 100], **TEXT)
    together = dart.select_images([short, long, other])
    alone = [dart.select_images([ctx])[0] for ctx in (short, long, other)]
    for selection, single in zip(together, alone):
        assert selection.keep.numel() == 7 and torch.equal(selection.keep, single.keep)
        assert torch.equal(selection.keep, selection.keep.unique())  # ascending, distinct
    assert {0, 4, 5, 6} <= set(together[2].keep.tolist())  # its four image pivots are kept


def test_dart_parameters_and_plan():
    dart = pruning_zoo.get_strategy("dart")
    assert dart.params.k == 2 and dart.params.positions == "keep"
    assert dart.plan(128, 576, 32) == (Stage(after_layer=1, keep=128),)
    assert dart.plan(576, 576, 32) == ()
    with pytest.raises(pruning_zoo.InvalidParameterError, match="below the model's 2 decoder layers"):
        dart.plan(8, 16, 2)
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("dart", pivot_image_tokens=0)
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("dart", k=0)


def expected_selection(keys: torch.Tensor, states: torch.Tensor, image: torch.Tensor, after: torch.Tensor, keep: int):
    """The rule written out token by token: keys [L, kv, dh] and final-normed states [L, d] of one sample; image,
    after: its image rows and the rows after the image."""
    norms = keys.flatten(1).abs().sum(-1)
    image_pivots = image[norms[image].topk(min(4, keep)).indices].tolist()
    text_pivots = after[norms[after].topk(min(4, len(after))).indices].tolist()
    pivots = image_pivots + text_pivots
    share, extra = divmod(keep - len(image_pivots), len(pivots))
    taken, left = set(image_pivots), [row for row in image.tolist() if row not in image_pivots]
    for i, pivot in enumerate(pivots):
        cosine = torch.nn.functional.cosine_similarity(states[pivot][None], states[left], dim=-1)
        picked = [left[j] for j in cosine.topk(share + (i < extra), largest=False).indices.tolist()]
        taken |= set(picked)
        left = [row for row in left if row not in picked]
    return sorted(image.tolist().index(row) for row in taken)


def test_dart_reads_the_models_own_keys_and_final_normed_states(family_model):
    """Layer K-1's keys as its attention used them (the KV cache of an unpruned run) and its output through the
    final norm (the unpruned run's hidden states) give the selection the rule above makes, on every family."""
    family, model = family_model
    inputs = family.inputs(3)
    recording = SelectionRecording(pruning_zoo.get_strategy("dart"))
    with torch.no_grad():
        with prune(model, recording.strategy, 0.5):
            model(**inputs)
        outputs = model(**inputs, use_cache=True, output_hidden_states=True)
        states = model.model.language_model.norm(outputs.hidden_states[2])  # layer 1's output, final norm
    keys = outputs.past_key_values.layers[1].keys.transpose(1, 2)  # [B, L, kv, dh], rotary applied
    image = inputs["input_ids"] == model.config.image_token_id
    assert len(recording.selections) == 3
    for sample, (stage, selection) in enumerate(recording.selections):
        rows = image[sample].nonzero().squeeze(1)
        after = torch.arange(int(rows.max()) + 1, image.shape[1])
        assert stage.after_layer == 1
        assert selection.keep.tolist() == expected_selection(keys[sample], states[sample], rows, after, stage.keep)
