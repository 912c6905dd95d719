"""PruMerge+: the outlier, sampling and merge rules on hand-made tokens, the code's attention against its own formula
on a tiny LLaVA, its parameters, and the engine's guarantees (keep-all, cached generation) for it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny_models
import torch
from pruning_zoo.strategies import prumerge_plus
from pruning_zoo.strategies.prumerge_plus import cls_attention, iqr_outliers, kept_tokens

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy import ScoreContext, Stage


def test_outliers_lie_above_q3_plus_1_5_iqr_as_numpy_percentile():
    scores = torch.rand(3, 50) ** 4
    for row, flags in zip(scores, iqr_outliers(scores, 1.5)):
        q1, q3 = np.percentile(row.numpy(), 25), np.percentile(row.numpy(), 75)
        assert flags.tolist() == (row.numpy() > q3 + 1.5 * (q3 - q1)).tolist()


def test_code_attention_is_the_one_head_attention_of_the_concatenated_projections():
    # The code: softmax(q . k / sqrt(width)) with q, k the whole k_proj/q_proj rows; over the patches, renormalised.
    heads, head_dim, patches = 4, 8, 10
    query, keys = torch.randn(heads, head_dim), torch.randn(1 + patches, heads, head_dim)
    per_head = (torch.einsum("hd,khd->hk", query, keys) / math.sqrt(head_dim)).softmax(-1)[:, 1:]
    code = (keys.flatten(1) @ query.flatten() / math.sqrt(heads * head_dim)).softmax(-1)[1:]
    torch.testing.assert_close(cls_attention(per_head[None], "code")[0], code / code.sum())
    torch.testing.assert_close(cls_attention(per_head[None], "mean")[0], per_head.mean(0))


def test_kept_tokens_are_the_outliers_by_attention_then_evenly_spaced_samples():
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.2, 0.0, 0.0, 0.8, 0.1, 0.0, 0.0, 0.1, 0.2]])
    outliers = torch.zeros(1, 12, dtype=torch.bool)
    outliers[0, [2, 6]] = True
    # Outliers 2 then 6; 3 samples at places 0, 3, 6 of the 10 others [0, 1, 3, 4, 5, 7, 8, 9, 10, 11]: 0, 4, 8.
    assert kept_tokens(scores, outliers, 5).tolist() == [[2, 6, 0, 4, 8]]
    assert kept_tokens(scores, outliers, 1).tolist() == [[2]]  # cut to the budget by attention
    assert kept_tokens(scores, torch.zeros_like(outliers), 3).tolist() == [[0, 4, 8]]  # 12 // 3 apart


def hand_made_context(scores: list[float], keep: int) -> ScoreContext:
    features = torch.tensor([[1.0], [10.0], [100.0], [1000.0], [1e4], [1e5]])
    e = torch.eye(4)
    keys = torch.stack([e[0], e[1], e[0], e[1], e[2], 0.6 * e[2] + 0.8 * e[3]])[:, None]  # [n, 1 head, 4]
    return ScoreContext(
        stage=Stage(after_layer=None, keep=keep), tokens=torch.zeros(6, 3), num_layers=2,
        observations={"vision_attention": lambda layer=-1: torch.tensor([scores]),
                      "vision_keys": lambda layer=-1: keys, "vision_features": lambda: features,
                      "vision_project": lambda features: features})


@pytest.mark.parametrize("order", ["code", "spatial"])
def test_each_kept_token_takes_its_nearest_keys_weighted_by_attention_and_one_extra_sums_the_pruned(order):
    strategy = pruning_zoo.get_strategy("prumerge_plus", attention="mean", neighbors=1, order=order)
    # Token 4 is the one outlier (IQR 0); the sample is the first other token, 0. Token 4's nearest key is token 5's
    # (cosine 0.6), token 0's is token 2's (1).
    ctx = hand_made_context([0.1, 0.1, 0.1, 0.1, 0.5, 0.1], 3)
    selection = strategy.select(strategy.score(ctx), 3, ctx)
    assert selection.keep.tolist() == [0, 4, 5] and selection.borrowed.tolist() == [False, False, True]
    merged_4, merged_0 = 1e4 + 0.1 * 1e5, 1.0 + 0.1 * 100.0
    extra = 0.1 * (10.0 + 100.0 + 1000.0 + 1e5)  # the pruned tokens 1, 2, 3, 5
    rows = [merged_4, merged_0, extra] if order == "code" else [merged_0, merged_4, extra]
    torch.testing.assert_close(selection.features[:, 0], torch.tensor(rows))
    assert [s.keep.tolist() for s in strategy.select_images([ctx, ctx])] == [[0, 4, 5]] * 2


def test_without_the_extra_token_every_slot_is_a_kept_token():
    strategy = pruning_zoo.get_strategy("prumerge_plus", attention="mean", neighbors=0, extra_token=False)
    ctx = hand_made_context([0.1, 0.1, 0.1, 0.1, 0.5, 0.1], 3)
    selection = strategy.select(strategy.score(ctx), 3, ctx)
    # Outlier 4, then samples at places 0 and 2 of the others [0, 1, 2, 3, 5] (5 // 2 apart): 0 and 2.
    assert selection.keep.tolist() == [0, 2, 4] and selection.borrowed is None
    assert selection.features[:, 0].tolist() == [1e4, 1.0, 100.0]  # the code's order, unmerged


def test_code_attention_on_llava_is_the_last_blocks_one_head_attention(tmp_path, monkeypatch):
    family = tiny_models.FAMILIES["llava"]
    model = family.build(tmp_path)
    inputs = family.inputs(2)
    seen = []
    monkeypatch.setattr(prumerge_plus, "cls_attention", lambda *a: seen.append(cls_attention(*a)) or seen[-1])
    tower = model.model.vision_tower
    block = (tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder).layers[-1].self_attn
    projections = {}
    handles = [block.q_proj.register_forward_hook(lambda m, a, out: projections.__setitem__("q", out)),
               block.k_proj.register_forward_hook(lambda m, a, out: projections.__setitem__("k", out))]
    try:
        with torch.no_grad(), prune(model, pruning_zoo.get_strategy("prumerge_plus"), 6):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    q, k = projections["q"], projections["k"]
    code = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)[:, 0, 1:]
    torch.testing.assert_close(seen[0], code / code.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("values", [{"iqr_factor": -1.0}, {"neighbors": -1}, {"attention": "sum"}, {"order": "x"}])
def test_prumerge_plus_refuses_parameters_out_of_bounds(values):
    with pytest.raises(pruning_zoo.InvalidParameterError):
        pruning_zoo.get_strategy("prumerge_plus", **values)
