"""LearnPruner training on a tiny model: the straight-through mask, the loss going down, resume, data files."""

import json

import pytest
import torch
import transformers
from PIL import Image
from pruning_zoo.strategies.learnpruner import WEIGHTS, LearnablePruningModule, LearnPruner
from typer.testing import CliRunner

from pruning_zoo import get_strategy
from pruning_zoo.cli import app
from pruning_zoo.engine.run import prune
from pruning_zoo.errors import PruningZooError
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Stage
from pruning_zoo.train.examples import FileExamples, SceneExamples
from pruning_zoo.train.learnpruner import (
    STATE,
    LearnPrunerTrainingConfig,
    SoftMaskedLanguageModel,
    answer_loss,
    encode,
    train_learnpruner,
)

BUDGET = 16  # stage 1 keeps 48 of 576


@pytest.fixture(scope="module")
def tiny(tiny_testbed_model):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_testbed_model, attn_implementation="eager")
    return model.eval(), transformers.AutoProcessor.from_pretrained(tiny_testbed_model)


class FixedBatch:
    def __init__(self, examples):
        self.examples = examples

    def batch(self, step, size):
        return self.examples[:size]


@pytest.fixture(scope="module")
def examples():
    return SceneExamples(seed=0).batch(0, 3)


def module_for(seed=0):
    torch.manual_seed(seed)
    return LearnablePruningModule(32, 16)


def test_the_straight_through_gradient_reaches_the_module_and_dropped_tokens(tiny, examples):
    model, processor = tiny
    module = module_for()
    with SoftMaskedLanguageModel(model, module, LearnPruner(), BUDGET, 1e-10) as masked:
        loss = answer_loss(model, encode(processor, examples, "cpu"))
    gradients = torch.autograd.grad(loss, masked.probabilities + list(module.parameters()))
    for probability_gradient, (sample, kept) in zip(gradients, masked.kept):
        dropped = torch.ones(576, dtype=torch.bool)
        dropped[kept] = False
        assert len(kept) == 48
        assert probability_gradient[kept].abs().sum() > 0 and probability_gradient[dropped].abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in gradients[len(masked.probabilities):])


class KeepGiven(PruningStrategy):
    name = "keep-given"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def __init__(self, kept):
        super().__init__({"positions": "keep"})
        self.kept = kept

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        scores = torch.zeros(ctx.tokens.shape[0])
        scores[self.kept.pop(0)] = 1.0
        return scores


def test_the_masked_forward_sees_exactly_the_hard_selection(tiny, examples):
    """The training forward's answer logits equal the engine's, pruning to the same tokens before the LLM."""
    model, processor = tiny
    inputs = encode(processor, examples, "cpu")
    labels = inputs.pop("labels")
    with torch.no_grad(), SoftMaskedLanguageModel(model, module_for(), LearnPruner(), BUDGET, 1e-10) as masked:
        masked_logits = model(**inputs).logits
    with torch.no_grad(), prune(model, KeepGiven([kept for _, kept in masked.kept]), 48):
        pruned_logits = model(**inputs).logits
    # Right padding: compare the answer positions, which both keep (text is never pruned).
    for row in range(len(examples)):
        positions = (labels[row] != -100).nonzero().squeeze(1) - 1
        offset = 576 - 48
        torch.testing.assert_close(masked_logits[row, positions], pruned_logits[row, positions - offset], atol=1e-4, rtol=1e-4)


def test_a_few_steps_lower_the_loss_and_change_the_weights(tiny, examples, tmp_path):
    model, processor = tiny
    inputs = encode(processor, examples, "cpu")

    def loss_with(module):
        with torch.no_grad(), SoftMaskedLanguageModel(model, module, LearnPruner(), BUDGET, 1e-10):
            return float(answer_loss(model, inputs))

    config = LearnPrunerTrainingConfig(budget=BUDGET, steps=6, batch_size=3, learning_rate=0.05, warmup=1, hidden=16, validate_every=6)
    train_learnpruner(model, processor, "tiny", FixedBatch(examples), [], tmp_path, config)
    trained, saved = LearnablePruningModule.load(tmp_path)
    before = module_for()  # the run's initial weights: the module is built right after seeding with config.seed
    assert not torch.equal(trained.mlp[0].weight, before.mlp[0].weight)
    assert loss_with(trained) < loss_with(before)
    assert saved["budget"] == BUDGET and saved["training"]["config"]["steps"] == 6
    assert [point["step"] for point in saved["training"]["curve"]] == [6]
    assert saved["model"]["fingerprint"] and not (tmp_path / STATE).exists()


def test_a_resumed_run_continues_from_its_step(tiny, examples, tmp_path):
    model, processor = tiny
    data = SceneExamples(seed=1)
    base = dict(budget=BUDGET, steps=4, batch_size=2, learning_rate=0.01, warmup=1, hidden=16, validate_every=2)
    train_learnpruner(model, processor, "tiny", data, examples[:2], tmp_path / "whole", LearnPrunerTrainingConfig(**base))
    first = train_learnpruner(model, processor, "tiny", data, examples[:2], tmp_path / "split",
                              LearnPrunerTrainingConfig(**base, stop_at=3, workers=2))
    assert first["stopped_at"] == 3 and (tmp_path / "split" / STATE).exists()
    resumed = train_learnpruner(model, processor, "tiny", data, examples[:2], tmp_path / "split",
                                LearnPrunerTrainingConfig(**base), resume=True)
    assert "stopped_at" not in resumed and [p["step"] for p in resumed["curve"]] == [2, 4]
    whole, split = (LearnablePruningModule.load(tmp_path / name)[0] for name in ("whole", "split"))
    for a, b in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(PruningZooError, match="--resume with other learning_rate"):
        train_learnpruner(model, processor, "tiny", data, [], tmp_path / "split-again",
                          LearnPrunerTrainingConfig(**base, stop_at=1))
        train_learnpruner(model, processor, "tiny", data, [], tmp_path / "split-again",
                          LearnPrunerTrainingConfig(**{**base, "learning_rate": 0.5}), resume=True)


def test_instruction_files_in_llava_and_flat_form(tmp_path):
    Image.new("RGB", (336, 336), "red").save(tmp_path / "a.png")
    llava = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "flat.jsonl").write_text(json.dumps({"image": "a.png", "question": "what color ?", "answer": "red"}) + "\n")
    for name in ("llava.json", "flat.jsonl"):
        (example,) = FileExamples(tmp_path / name, None, seed=0).batch(0, 1)
        assert (example.question, example.answer, example.image.size) == ("what color ?", "red", (336, 336))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "question": "q"}) + "\n")
    with pytest.raises(PruningZooError, match=r"bad.jsonl, record 1: needs 'question' and 'answer'"):
        FileExamples(tmp_path / "bad.jsonl", None, seed=0)
    (tmp_path / "missing.jsonl").write_text(json.dumps({"image": "b.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(PruningZooError, match="cannot read image .*b.png.*--image-folder"):
        FileExamples(tmp_path / "missing.jsonl", None, seed=0).batch(0, 1)


def test_the_train_command_saves_a_module_the_strategy_loads(tiny_testbed_model, tiny, tmp_path):
    out = tmp_path / "module"
    result = CliRunner().invoke(app, ["train", "learnpruner", "--model", tiny_testbed_model, "--out", str(out),
                                      "--budget", str(BUDGET), "--steps", "2", "--batch-size", "2", "--hidden", "16",
                                      "--validate-every", "2", "--validation-limit", "2", "--device", "cpu",
                                      "--positions", "keep"])
    assert result.exit_code == 0, result.output
    assert (out / WEIGHTS).is_file() and "validation accuracy" in result.output
    record = json.loads((out / "learnpruner.json").read_text())["training"]
    assert record["curve"][-1]["validation_accuracy"] is not None and record["command"].startswith("pruning-zoo ")
    assert record["config"]["positions"] == "keep"
    model, processor = tiny
    strategy = get_strategy("learnpruner", module=str(out))
    example = SceneExamples(seed=0).batch(0, 1)[0]
    inputs = processor(text=[processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}],
                                                           add_generation_prompt=True, tokenize=False)], images=[example.image], return_tensors="pt")
    with torch.no_grad(), prune(model, strategy, BUDGET) as run:
        model(**inputs)
    assert run.records[0].images[0].kept_per_layer[-1] == BUDGET
    again = CliRunner().invoke(app, ["train", "learnpruner", "--model", tiny_testbed_model, "--out", str(out), "--device", "cpu"])
    assert again.exit_code == 2 and "is not empty" in again.output
