"""The image-VQA suite's six lmms-eval tasks, run by their own definitions over the local copies of their hub datasets
(suites/hub-copies): the copies are the hub's schema and reproducible, each task's own code is what ran and scored,
its metrics are right when the answers are, and an offline machine is told how to use local copies."""

import gzip
import io
import json
from pathlib import Path

import datasets
import lmms_eval
import numpy as np
import pandas as pd
import PIL.Image
import pytest
from typer.testing import CliRunner

from pruning_zoo.cli import app
from pruning_zoo.errors import SetupError
from pruning_zoo.eval import lmms_model
from pruning_zoo.eval.runner import Sweep
from pruning_zoo.eval.suite import builtin_suite_folder, load_suite, validate_suite
from pruning_zoo.leaderboard.build import build
from pruning_zoo.testbed.hub_copies import FEATURES, FILES, write_copies

COPIES = builtin_suite_folder() / "hub-copies"
TESTBED = builtin_suite_folder() / "testbed"
LMMS_TASKS = Path(lmms_eval.__file__).parent / "tasks"
#: Suite task -> (the task's folder in lmms-eval, its metrics as its YAML lists them).
REAL_TASKS = {
    "gqa": ("gqa", ["exact_match"]),
    "mme": ("mme", ["mme_perception_score", "mme_cognition_score"]),
    "pope": ("pope", ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"]),
    "textvqa_val": ("textvqa", ["exact_match", "submission"]),
    "scienceqa_img": ("scienceqa", ["exact_match"]),
    "mmbench_en_dev_static": ("mmbench", ["gpt_eval_score", "submission"]),
}
WIDE = {"COLUMNS": "200"}


def decoded(image: dict) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(image["bytes"])))


def test_the_local_suite_names_the_image_vqa_tasks():
    local, hub = load_suite("image-vqa-local"), load_suite("image-vqa")
    assert local.tasks == [task if task != "mmbench_en_dev" else "mmbench_en_dev_static" for task in hub.tasks]
    assert set(local.strategies) == set(hub.strategies) | {"learnpruner"} and local.data == "hub-copies"


def test_the_copies_are_reproducible_from_the_testbed_and_have_the_hubs_schema(tmp_path):
    counts = write_copies(TESTBED, tmp_path)
    for (repository, config, split), rows in counts.items():
        committed, fresh = COPIES / repository / FILES[(repository, config, split)], tmp_path / repository / FILES[
            (repository, config, split)]
        stale = f"{committed} is stale: `pruning-zoo testbed hub-copies`"
        old, new = pd.read_parquet(committed), pd.read_parquet(fresh)
        images = [column for column in old if column == "image"]
        pd.testing.assert_frame_equal(old.drop(columns=images), new.drop(columns=images), obj=stale)
        for column in images:  # JPEG: another libjpeg may round a pixel differently, never more
            for before, after in zip(old[column], new[column]):
                difference = np.abs(decoded(before).astype(int) - decoded(after).astype(int))
                assert before["path"] == after["path"] and difference.max() <= 8, stale
        # Read back the way lmms-eval reads it: the repository folder by its hub id, the config, the split.
        loaded = datasets.load_dataset(str(COPIES / repository), config if config != "default" else None, split=split)
        assert loaded.features == FEATURES[(repository, config, split)] and len(loaded) == rows
        card = (COPIES / repository / "README.md").read_text()
        assert card.split("dataset_info:")[0] == (tmp_path / repository / "README.md").read_text().split("dataset_info:")[0]
    assert all(30 <= rows <= 48 for (_, config, _), rows in counts.items() if config != "testdev_balanced_images")


def test_the_copies_hold_what_each_tasks_scoring_needs():
    mme = pd.read_parquet(COPIES / "lmms-lab-encoder/MME" / FILES[("lmms-lab-encoder/MME", "default", "test")])
    # MME scores pairs: one Yes and one No per image
    assert set(mme.groupby("question_id")["answer"].apply(lambda answers: "/".join(sorted(answers)))) == {"No/Yes"}
    assert set(mme["category"]) == {"existence", "position", "count", "numerical_calculation"}
    pope = pd.read_parquet(COPIES / "lmms-lab-encoder/POPE" / FILES[("lmms-lab-encoder/POPE", "default", "test")])
    assert pope.groupby("category")["answer"].value_counts().unstack().eq(6).all().all()
    mmbench = pd.read_parquet(COPIES / "lmms-lab-encoder/MMBench" / FILES[("lmms-lab-encoder/MMBench", "en", "dev")])
    for index, copies in mmbench.groupby(mmbench["index"] % 1_000_000):
        options = [row[row["answer"]] for _, row in copies.iterrows()]
        assert len(set(options)) == 1 and len(copies) == copies[["A", "B", "C", "D"]].notna().sum(axis=1).iloc[0]
    textvqa = pd.read_parquet(COPIES / "lmms-lab-encoder/textvqa" / FILES[("lmms-lab-encoder/textvqa", "default", "validation")])
    assert textvqa["answers"].map(len).eq(10).all()


def run_task(task: str, output: Path, strategy: str = "fastv", limit: int = 8):
    suite = validate_suite({"name": "t", "tasks": [task], "models": [str(TESTBED / "model")], "data": str(COPIES),
                            "strategies": {strategy: {}}, "budgets": [64], "limit": limit, "batch_size": 4}, origin="t")
    (outcome,) = Sweep(suite, output, device="cpu", command="pytest").run()
    assert outcome.status == "finished", outcome.error
    folder = outcome.folder
    samples = [json.loads(line) for line in gzip.open(folder / "samples.jsonl.gz", "rt")]
    return folder, json.loads((folder / "config.json").read_text()), json.loads((folder / "metrics.json").read_text()), samples


@pytest.mark.parametrize("task", sorted(REAL_TASKS))
def test_each_task_runs_by_lmms_evals_own_definition_on_its_local_copy(task, tmp_path):
    folder, config, metrics, samples = run_task(task, tmp_path)
    directory, metric_names = REAL_TASKS[task]
    record = config["task"]
    assert record["name"] == task and record["metrics"] == metric_names
    assert Path(record["yaml_path"]).parent == LMMS_TASKS / directory  # the installed lmms-eval's own YAML
    assert record["local_copy"] == str(COPIES / record["dataset_path"])
    functions = record["functions"]
    assert "doc_to_text" in functions and "doc_to_visual" in functions
    assert all(Path(where.rsplit(":", 1)[0]).parent == LMMS_TASKS / directory for where in functions.values())
    if task != "gqa":  # GQA scores with lmms-eval's built-in exact_match; the others with their process_results
        assert functions["process_results"].rsplit(":", 1)[1].endswith("process_results")
    assert set(metrics["scores"]) <= set(metric_names) and metrics["primary_metric"] == metric_names[0]
    assert metrics["documents"] == len(samples) == 8
    assert all(sample["entering_llm"] <= 576 and sample["llm_prefill_flops_2ndm"] > 0 for sample in samples)
    if "submission" in metric_names:  # what the task's aggregation writes is kept with the cell
        assert any((folder / "submissions").iterdir())


#: How to answer each task's document correctly, from its own columns.
ORACLE = {
    "gqa": lambda doc: doc["answer"], "mme": lambda doc: doc["answer"], "pope": lambda doc: doc["answer"],
    "textvqa_val": lambda doc: doc["answers"][0], "scienceqa_img": lambda doc: "ABCDE"[doc["answer"]],
    "mmbench_en_dev_static": lambda doc: doc["answer"],
}
#: The metrics of perfect answers over the first 16 documents (MME: 200 per category, 3 perception categories and 1
#: cognition; MMBench: 100 x the share of circular groups answered right).
PERFECT = {
    "gqa": {"exact_match": 1.0}, "mme": {"mme_perception_score": 600.0, "mme_cognition_score": 200.0},
    "pope": {"pope_accuracy": 1.0, "pope_precision": 1.0, "pope_recall": 1.0, "pope_f1_score": 1.0},
    "textvqa_val": {"exact_match": 1.0}, "scienceqa_img": {"exact_match": 1.0},
    "mmbench_en_dev_static": {"gpt_eval_score": 100.0},
}


@pytest.mark.parametrize("task", sorted(REAL_TASKS))
def test_each_tasks_own_scoring_gives_full_marks_to_right_answers(task, tmp_path, monkeypatch):
    class Oracle(lmms_model.PrunedVLM):
        def _generate_batch(self, batch):
            super()._generate_batch(batch)  # the model still runs: its measurements are recorded
            _, _, _, doc_ids, tasks, splits = zip(*batch)
            return [ORACLE[task](doc) for doc in self._documents(tasks, splits, doc_ids)]

    monkeypatch.setattr(lmms_model, "PrunedVLM", Oracle)
    _, _, metrics, _ = run_task(task, tmp_path, strategy="none", limit=16)
    assert {name: metrics["scores"][name] for name in PERFECT[task]} == pytest.approx(PERFECT[task])


def test_the_leaderboard_has_a_table_per_task_with_its_metric_names(tmp_path):
    for task in ("pope", "mme"):
        run_task(task, tmp_path / "results", strategy="none", limit=8)
    page = build([tmp_path / "results"], tmp_path / "board")[0].read_text()
    assert "## mme:" in page and "## pope:" in page
    headers = [[cell.strip() for cell in line.split("|")] for line in page.splitlines() if line.startswith("| budget")]
    mme_header = next(header for header in headers if "mme_perception_score" in header)
    assert mme_header[4:7] == ["mme_perception_score", "% of unpruned", "mme_cognition_score"]
    pope_header = next(header for header in headers if "pope_accuracy" in header)
    assert [name for name in pope_header if name.startswith("pope_")] == REAL_TASKS["pope"][1]


def test_a_missing_or_partial_local_copy_is_reported_before_anything_runs(tmp_path):
    data = tmp_path / "data"
    (data / "lmms-lab-encoder").mkdir(parents=True)
    partial = data / "lmms-lab-encoder" / "GQA"  # the instructions without the images config's split
    partial.mkdir()
    (partial / "README.md").write_text("---\nconfigs:\n- config_name: other\n  data_files:\n  - split: testdev\n"
                                       "    path: other/testdev-*\n---\n")
    (partial / "other").mkdir()
    datasets.Dataset.from_dict({"x": [1]}).to_parquet(str(partial / "other" / "testdev-0.parquet"))
    result = CliRunner().invoke(app, ["run", "--suite", "image-vqa-local", "--data", str(data), "--tasks", "gqa,pope",
                                      "--output", str(tmp_path / "out"), "--device", "cpu"], env=WIDE)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "the sweep cannot start" in text
    assert "task 'gqa' reads lmms-lab-encoder/GQA (config testdev_balanced_instructions, split testdev): the copy in" in text
    assert (f"task 'pope' reads lmms-lab-encoder/POPE (split test): there is no folder {data}/lmms-lab-encoder/POPE; "
            f"on a machine with network run `hf download lmms-lab-encoder/POPE --repo-type dataset --local-dir "
            f"{data}/lmms-lab-encoder/POPE`") in text
    assert not (tmp_path / "out").exists()


def test_the_hub_suite_offline_says_at_once_how_to_use_local_copies(tmp_path, offline_hub, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # the judge check aside: this is about the hub
    result = CliRunner().invoke(app, ["run", "--suite", "image-vqa", "--output", str(tmp_path / "out")], env=WIDE)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and text.count("the Hugging Face hub cannot be used") == 1
    for dataset in ("GQA", "MME", "POPE", "textvqa", "ScienceQA", "MMBench"):
        assert f"dataset lmms-lab-encoder/{dataset} (task" in text
    assert "model llava-hf/llava-1.5-7b-hf" in text and "--data DIR" in text and "image-vqa-local" in text
    assert not (tmp_path / "out").exists()


def test_mmbench_judged_by_an_api_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    suite = validate_suite({"name": "t", "tasks": ["mmbench_en_dev"], "models": [str(TESTBED / "model")],
                            "data": str(COPIES), "strategies": {"none": {}}, "budgets": [64], "limit": 4}, origin="t")
    with pytest.raises(SetupError, match=r"task 'mmbench_en_dev' asks an OpenAI-compatible API .* run "
                                         r"'mmbench_en_dev_static'"):
        Sweep(suite, tmp_path / "out", device="cpu").run()

