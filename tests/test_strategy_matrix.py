"""One matrix: every built-in strategy x every model family x batch sizes 1 and 3 x budgets (the unpruned
count, 1 and one between). Each cell checks the achieved budget of every image against what the strategy's
budget means, finite logits, and that a second run gives the same logits and records.

A new strategy joins the matrix with one line in STRATEGIES.
"""

from __future__ import annotations

import pytest
import torch

import pruning_zoo
from pruning_zoo.engine.run import prune
from pruning_zoo.strategy.budget import BudgetMeaning, resolve_budget

#: label -> (strategy name, parameters)
STRATEGIES = {
    "none": ("none", {}),
    "random": ("random", {"seed": 1}),
    "pool": ("pool", {}),
    "fastv": ("fastv", {}),
    "fastv-average": ("fastv", {"k": 1, "budget_counts": "per_layer_average"}),
    "visionzip": ("visionzip", {}),
    "transprune": ("transprune", {}),
    "transprune-average": ("transprune", {"budget_counts": "per_layer_average"}),
    "learnpruner": ("learnpruner", {}),
    "divprune": ("divprune", {}),
    "dart": ("dart", {}),
    "pyramiddrop": ("pyramiddrop", {}),
    "sparsevlm": ("sparsevlm", {}),
    "sparsevlm-average": ("sparsevlm", {"budget_counts": "per_layer_average"}),
    "vispruner": ("vispruner", {}),
    "prumerge_plus": ("prumerge_plus", {}),
    "cdpruner": ("cdpruner", {}),
    "holov": ("holov", {}),
    "tome": ("tome", {}),
    "tome-fastv": ("tome", {"fastv_k": 1}),
}
#: (label, family) cells a strategy refuses with a clear error: ToMe's stage inside the vision tower is not
#: supported on LLaVA-NeXT (unpadded crops).
REFUSED = {(label, "llava_next") for label in ("tome", "tome-fastv")}
BUDGETS = {"unpruned": 1.0, "one": 1, "half": 0.5}


def run_once(model, inputs, label, budget):
    name, params = STRATEGIES[label]
    strategy = pruning_zoo.get_strategy(name, **params)
    with torch.no_grad(), prune(model, strategy, budget) as run:
        logits = model(**inputs).logits
    return strategy, logits, run.records


@pytest.mark.parametrize("budget_label", BUDGETS)
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("label", STRATEGIES)
def test_strategy_matrix(family_model, label, batch_size, budget_label):
    family, model = family_model
    inputs = family.inputs(batch_size)
    budget = BUDGETS[budget_label]
    try:
        strategy, logits, records = run_once(model, inputs, label, budget)
    except pruning_zoo.InvalidParameterError as error:
        if (label, family.name) in REFUSED:
            assert "no stage inside its vision tower" in str(error) and budget_label != "unpruned"
            return
        # Only a per-layer average can be out of reach: the layers before the first drop see every token.
        assert STRATEGIES[label][1].get("budget_counts") == "per_layer_average" and budget_label == "one", error
        assert "lowest reachable average" in str(error)
        return
    _, again, records_again = run_once(model, inputs, label, budget)

    assert torch.isfinite(logits).all()
    assert torch.equal(logits, again), "a second run must give the same logits"
    (record,) = records
    assert record == records_again[0]
    assert len(record.images) == batch_size
    num_layers = model.config.get_text_config().num_hidden_layers
    for image in record.images:
        wanted = resolve_budget(budget, image.num_visual)
        assert len(image.kept_per_layer) == num_layers
        assert all(a >= b for a, b in zip(image.kept_per_layer, image.kept_per_layer[1:])), "tokens only ever drop"
        if label == "none" or wanted == image.num_visual:
            assert image.kept_per_layer == [image.num_visual] * num_layers
        elif strategy.budget_meaning == BudgetMeaning.ENTERING_LLM:
            assert image.entering_llm == wanted
        elif strategy.budget_meaning == BudgetMeaning.AFTER_PRUNING:
            assert image.kept_per_layer[-1] == wanted
        else:  # the closest average the integer stage counts allow
            assert abs(image.average_per_layer - wanted) <= image.num_visual / num_layers
    for sample, tokens in enumerate(record.tokens_per_layer):
        visual = sum(image.kept_per_layer[0] for image in record.images if image.sample == sample)
        text = int(inputs["attention_mask"][sample].sum()) - sum(i.num_visual for i in record.images if i.sample == sample)
        assert tokens[0] == text + visual
