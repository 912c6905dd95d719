"""The offline testbed: deterministic scenes, right answers and evidence on hand-made scenes, the reference
model's files, its training path, and the committed model's accuracy on a fixed slice of the test split."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
import transformers

import pruning_zoo
from pruning_zoo.testbed import evaluate as testbed
from pruning_zoo.testbed.model import build_processor, build_tokenizer, pixel_values, prompt
from pruning_zoo.testbed.questions import attribute, counting, existence, questions_for, reading, spatial
from pruning_zoo.testbed.scenes import Scene, SceneObject, generate_scene, object_patches
from pruning_zoo.testbed.splits import read_split

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "suites" / "testbed"


def square(color, x, y, radius=14, label=None, shape="square"):
    """A scene object with its evidence computed the way the generator does."""
    return SceneObject(shape, color, "small", x, y, radius, label, object_patches(shape, x, y, radius))


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_scenes_are_deterministic_and_differ_by_seed():
    assert generate_scene(5) == generate_scene(5)
    assert png(generate_scene(5).render()) == png(generate_scene(5).render())
    assert generate_scene(5) != generate_scene(6)
    assert questions_for(generate_scene(5)) == questions_for(generate_scene(5))


def test_a_square_covers_the_patches_under_it():
    # Centred at (35, 35) with half-side 14: pixels 21..49, so patch rows and columns 1..3 (14 px each).
    obj = square("red", 35, 35)
    assert obj.patches == tuple(r * 24 + c for r in (1, 2, 3) for c in (1, 2, 3))


def test_answers_and_evidence_on_a_hand_made_scene():
    red = square("red", 35, 35)
    blue = square("blue", 300, 300, label="K", radius=20)
    green = square("green", 300, 40, shape="circle")
    scene = Scene(1, (red, blue, green))
    rng = random.Random(0)

    count = counting(Scene(1, (red, blue, green, square("red", 150, 200))), random.Random(0))
    assert count.answer in {"one", "two", "three"}
    if count.question == "how many red objects are there ?":
        assert count.answer == "two"
    if count.question == "how many square objects are there ?":
        assert count.answer == "three"

    read = reading(scene, rng)
    assert (read.question, read.answer, read.evidence) == ("what is written on the blue square ?", "k", blue.patches)

    for _ in range(20):
        where = spatial(scene, rng)
        obj = {"red": red, "blue": blue, "green": green}[where.question.split()[2]]
        side = where.question.split(" in the ")[1].split()[0]
        truth = {"left": obj.x < 168, "right": obj.x > 168, "top": obj.y < 168, "bottom": obj.y > 168}[side]
        assert where.answer == ("yes" if truth else "no") and where.evidence == obj.patches

        question = existence(scene, rng)
        color, shape = question.question.split()[3:5]
        present = any(o.color == color and o.shape == shape for o in scene.objects)
        assert question.answer == ("yes" if present else "no")
        if question.answer == "no":
            lookalikes = [o for o in scene.objects if o.color == color or o.shape == shape]
            assert set(question.evidence) == {p for o in lookalikes for p in o.patches}
            assert question.negative in {"random", "popular", "adversarial"}
            if question.negative == "random":
                assert shape not in {o.shape for o in scene.objects}

        asked = attribute(scene, rng)
        if asked.question == "what color is the circle ?":
            assert asked.answer == "green" and asked.evidence == green.patches


def test_the_processor_tokenizes_like_training_and_normalises_like_pixel_values():
    processor = build_processor(build_tokenizer())
    image = generate_scene(3).render()
    inputs = processor(images=image, text=prompt("what color is the circle ?"), return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == 576
    assert torch.allclose(inputs["pixel_values"], pixel_values([image]), atol=1e-6)
    from pruning_zoo.testbed.train import Encoder

    assert inputs["input_ids"][0].tolist() == Encoder(processor.tokenizer).prompt_ids("what color is the circle ?")


def test_an_interrupted_training_resumes_to_the_same_model(tmp_path):
    """Two steps, stop, resume to four: to float rounding (the reloaded AdamW state differs in its last bits,
    about 1e-8), the same losses and weights as four steps straight."""
    from safetensors.torch import load_file

    from pruning_zoo.testbed.train import CHECKPOINT, TrainingConfig, train

    config = dict(steps=4, scenes_per_step=1, workers=0, validate_every=4, validation_questions=2, warmup=1)
    straight = train(tmp_path / "straight", TrainingConfig(**config), device="cpu")
    stopped = train(tmp_path / "resumed", TrainingConfig(**config, stop_at=2), device="cpu")
    assert stopped["stopped_at"] == 2 and (tmp_path / "resumed" / CHECKPOINT).is_file()
    resumed = train(tmp_path / "resumed", TrainingConfig(**config), device="cpu", resume=True)
    assert not (tmp_path / "resumed" / CHECKPOINT).exists() and resumed["resumed"]
    assert [(c["from_step"], c["to_step"]) for c in resumed["calls"]] == [(0, 2), (2, 4)]
    assert json.loads((tmp_path / "resumed" / "training.json").read_text())["calls"] == resumed["calls"]
    assert [p["loss"] for p in resumed["curve"]] == pytest.approx([p["loss"] for p in straight["curve"]], rel=1e-6)
    weights = [load_file(next((tmp_path / run).glob("*00001*.safetensors"))) for run in ("straight", "resumed")]
    assert all(torch.allclose(weights[0][name], weights[1][name], rtol=0, atol=1e-6) for name in weights[0])


def test_scene_streams_resume_where_each_worker_left_off():
    """Step t's batch comes from worker t % N; a stream restarted at step s gives every later step the same
    scenes, with the loader asking worker 0 first."""
    from pruning_zoo.testbed.train import SceneStream

    def seeds(workers, start, steps, batch=2):
        streams = []
        for worker in range(workers):
            stream = SceneStream(0, batch, start_step=start)
            info = type("Info", (), {"id": worker, "num_workers": workers})
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
                iterator = iter(stream)
                streams.append([[next(iterator)[1][0].scene_seed for _ in range(batch)] for _ in range(steps)])
        return [streams[step % workers][step // workers] for step in range(steps)]

    assert seeds(3, 5, 4) == seeds(3, 0, 9)[5:]


def test_training_runs_saves_and_loads_back(tmp_path):
    from pruning_zoo.testbed.train import TrainingConfig, train

    config = TrainingConfig(steps=2, scenes_per_step=2, workers=0, validate_every=2, validation_questions=4, warmup=1)
    record = train(tmp_path / "model", config, device="cpu")
    assert record["curve"][-1]["step"] == 2 and record["parameters"] > 7_000_000
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "model")
    assert isinstance(processor, transformers.LlavaProcessor) and model.config.image_seq_length == 576


def test_the_reference_model_loads_offline_within_the_size_limit():
    model, processor = testbed.load_reference(TESTBED / "model")
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    record = json.loads((TESTBED / "model" / "training.json").read_text())
    assert record["curve"][-1]["validation_accuracy"]["overall"] >= 0.9
    total = sum(f.stat().st_size for f in (TESTBED / "model").glob("*.safetensors"))
    assert total <= 48 * 2**20


def test_the_committed_model_reaches_its_recorded_accuracy_on_a_slice():
    """Re-answer 32 fixed test questions and compare, question by question, with the committed evaluation."""
    committed = json.loads((ROOT / "leaderboard" / "testbed" / "test-budget-64.json").read_text())
    recorded = {row["id"]: row for row in committed["results"]["none"]["questions"]}
    records = testbed.sample(read_split(TESTBED, "test"), 32, seed=1)
    model, processor = testbed.load_reference(TESTBED / "model")
    rows = testbed.evaluate(model, processor, records, TESTBED, pruning_zoo.get_strategy("none"), 1.0)
    agree = sum(row["correct"] == recorded[row["id"]]["correct"] for row in rows)
    assert agree >= 31, f"{agree}/32 answers agree with the committed evaluation"


def test_the_oracle_keeps_the_evidence_first():
    oracle = testbed.EvidenceOracle(seed=0)
    oracle.for_batch([[3, 7, 11]])
    from pruning_zoo.strategy import ScoreContext, Stage

    ctx = ScoreContext(stage=Stage(None, 4), tokens=torch.zeros(20, 2), num_layers=4)
    kept = oracle.select(oracle.score(ctx), 4, ctx).keep.tolist()
    assert {3, 7, 11} <= set(kept) and len(kept) == 4
    assert testbed.evidence_recall([3, 7, 11, 12], kept) in (0.75, 1.0)
    assert testbed.evidence_recall([], kept) is None


def test_a_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pruning-zoo testbed splits"):
        read_split(tmp_path, "test")


@pytest.mark.parametrize("split", ["validation", "test"])
def test_the_committed_splits_are_what_the_generator_makes(split):
    from pruning_zoo.testbed.splits import SPLITS, as_question

    first, count = SPLITS[split]
    expected = [q for seed in range(first, first + count) for q in questions_for(generate_scene(seed))]
    assert [as_question(r) for r in read_split(TESTBED, split)] == expected


def test_the_lmms_eval_task_reads_the_splits_and_scores_by_family():
    """suites/testbed/testbed.yaml's hooks (lmms-eval itself loads the YAML; see the testbed README)."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("testbed_utils", TESTBED / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    config = yaml.load((TESTBED / "testbed.yaml").read_text().replace("!function", ""), Loader=yaml.SafeLoader)
    for split, path in config["dataset_kwargs"]["data_files"].items():
        assert (TESTBED / path).is_file() and split in ("validation", "test")
    docs = read_split(TESTBED, "test")[:12]
    assert utils.doc_to_visual(docs[0])[0].size == (336, 336)
    assert utils.doc_to_text(docs[0]) == docs[0]["question"]
    scored = [utils.process_results(doc, [doc["answer"] if i % 2 else "wrong"]) for i, doc in enumerate(docs)]
    assert [s["accuracy"] for s in scored] == [float(i % 2) for i in range(12)]
    rows = [s["attribute_accuracy"] for s in scored]
    attribute = [float(i % 2) for i, doc in enumerate(docs) if doc["family"] == "attribute"]
    assert utils.aggregate_attribute(rows) == sum(attribute) / len(attribute)
