"""The suite runner through the real lmms-eval evaluator on CPU: full sweeps of the testbed task on a tiny
model, resuming after an interruption, failing cells, offline errors, and the lmms-eval model itself."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.engine.loading import load_vlm
from pruning_zoo.errors import PruningZooError, SetupError
from pruning_zoo.eval import results
from pruning_zoo.eval.lmms_model import PrunedVLM
from pruning_zoo.eval.runner import Sweep
from pruning_zoo.eval.suite import validate_suite
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Stage

BUILTIN = ["none", "random", "pool", "fastv", "visionzip", "transprune", "learnpruner"]


def make_suite(model: str, strategies, budgets=(64,), limit=6, batch_size=3, tasks=("testbed",), task_paths=()):
    data = {"name": "test", "tasks": list(tasks), "models": [model], "budgets": list(budgets), "limit": limit,
            "batch_size": batch_size, "task_paths": list(task_paths),
            "strategies": strategies if isinstance(strategies, dict) else {name: {} for name in strategies}}
    return validate_suite(data, origin="test")


def sweep(suite, output, on_cell=None):
    return Sweep(suite, output, device="cpu", command="pytest", on_cell=on_cell)


def read(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def test_a_full_sweep_of_the_testbed_suite_through_lmms_eval(tiny_testbed_model, tmp_path):
    suite = make_suite(tiny_testbed_model, BUILTIN, budgets=(64, 0.25))
    outcomes = sweep(suite, tmp_path).run()
    assert [o.status for o in outcomes] == ["finished"] * (1 + 2 * (len(BUILTIN) - 1))
    by_cell = {(o.cell.strategy, o.cell.budget_label): o.folder for o in outcomes}
    unpruned = read(by_cell["none", "all"], results.METRICS)
    assert unpruned["documents"] == 6 and unpruned["primary_metric"] == "accuracy"
    assert unpruned["visual_tokens"]["entering_llm"] == unpruned["visual_tokens"]["average_per_layer"] == 576
    for (strategy, budget), folder in by_cell.items():
        metrics, config = read(folder, results.METRICS), read(folder, results.CONFIG)
        samples = results.read_samples(folder)
        assert len(samples) == 6 and {s["id"] for s in samples} == {s["id"] for s in samples if s["id"]}
        assert all(s["prediction"] is not None and s["visual_tokens"] == 576 for s in samples)
        assert 0.0 <= metrics["scores"]["accuracy"] <= 1.0
        assert config["cell"]["strategy"] == strategy and config["git_sha"] and config["versions"]["lmms-eval"]
        assert set(config["seconds"]) == {"evaluate", "metrics", "total", "processes"}  # no compiled mode on a CPU by default
        assert config["seconds"]["total"] >= config["seconds"]["evaluate"] > 0
        [process] = config["seconds"]["processes"]
        assert process["evaluate"] == config["seconds"]["evaluate"] >= process["prepare"] + process["generate"]
        assert process["prepare"] > 0 and process["generate"] > 0
        latency = metrics["latency"]
        assert latency["clock"].startswith("CPU wall-clock") and latency["time_to_first_token_ms"] > 0
        assert latency["batches"] == 2 and latency["timed_batches"] == 1
        if strategy == "none":
            continue
        kept = 64 if budget == "64" else 144
        tokens = metrics["visual_tokens"]
        if tokens["budget_counts"] == BudgetMeaning.ENTERING_LLM.value:
            assert tokens["entering_llm"] == kept
        else:  # in-LLM methods: the last stage keeps the budget, so the average lies between
            assert kept < tokens["average_per_layer"] < 576
        assert metrics["flops"]["llm_prefill_2ndm"] < unpruned["flops"]["llm_prefill_2ndm"]
        assert metrics["flops"]["vision"] == unpruned["flops"]["vision"]
        assert latency["selection_ms"] > 0
        assert 0 <= metrics["evidence_recall"] <= 1  # the testbed's documents carry evidence masks


def test_batched_generation_gives_the_answers_of_batch_one(tiny_testbed_model, tmp_path):
    answers = {}
    for batch_size in (1, 4):
        suite = make_suite(tiny_testbed_model, ["fastv"], limit=8, batch_size=batch_size)
        (outcome,) = sweep(suite, tmp_path / str(batch_size)).run()
        answers[batch_size] = [row["prediction"] for row in results.read_samples(outcome.folder)]
    assert answers[1] == answers[4]


def test_rerunning_skips_finished_cells_and_an_interrupted_run_resumes(tiny_testbed_model, tmp_path, monkeypatch):
    suite = make_suite(tiny_testbed_model, ["none", "random", "pool", "fastv"], limit=3)
    renames = []
    real_rename = os.rename

    def interrupt_the_third_write(source, target):
        renames.append(target)
        if len(renames) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the third cell was being stored
        real_rename(source, target)

    monkeypatch.setattr(results.os, "rename", interrupt_the_third_write)
    with pytest.raises(KeyboardInterrupt):
        sweep(suite, tmp_path).run()
    monkeypatch.setattr(results.os, "rename", real_rename)
    first = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(first) == 2 and not any(name.startswith(results.TEMPORARY_PREFIX) for name in first)
    stamps = {name: (tmp_path / name / results.METRICS).read_bytes() for name in first}

    (tmp_path / f"{results.TEMPORARY_PREFIX}left-by-a-killed-run").mkdir()  # a kill -9 leaves one behind
    states = []
    outcomes = sweep(suite, tmp_path, on_cell=lambda cell, state: states.append(state)).run()
    assert [o.status for o in outcomes] == ["skipped", "skipped", "finished", "finished"]
    assert states.count("running") == 2  # no finished cell was recomputed
    assert {name: (tmp_path / name / results.METRICS).read_bytes() for name in first} == stamps
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(o.folder.name for o in outcomes)  # none lost
    assert all(results.status(o.folder) == "finished" for o in outcomes)

    again = sweep(suite, tmp_path).run()
    assert [o.status for o in again] == ["skipped"] * 4


class Broken(PruningStrategy):
    name = "broken"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        raise RuntimeError("this strategy always fails")


class BrokenPlugin:
    @pruning_zoo.hookimpl
    def register_strategies(self, register):
        register(Broken)


@pytest.fixture
def broken_strategy():
    plugins.reset()
    plugins.plugin_manager().register(BrokenPlugin(), name="broken-plugin")
    yield
    plugins.reset()


def test_a_failing_strategy_is_recorded_and_the_others_finish(tiny_testbed_model, tmp_path, broken_strategy):
    suite = make_suite(tiny_testbed_model, ["none", "broken", "fastv"], limit=3)
    outcomes = sweep(suite, tmp_path).run()
    assert [o.status for o in outcomes] == ["finished", "failed", "finished"]
    failed = outcomes[1].folder
    error = read(failed, results.ERROR)
    assert "this strategy always fails" in error["error"] and "Traceback" in error["traceback"]
    assert read(failed, results.CONFIG)["cell"]["strategy"] == "broken"
    assert not (failed / results.METRICS).exists()
    # A rerun retries the failed cell (it may have been fixed) and skips the finished ones.
    states = []
    again = sweep(suite, tmp_path, on_cell=lambda cell, state: states.append((cell.strategy, state))).run()
    assert [o.status for o in again] == ["skipped", "failed", "skipped"]
    assert ("broken", "running") in states and ("fastv", "running") not in states


def test_a_model_that_cannot_be_loaded_is_a_clear_error(offline_hub):
    with pytest.raises(PruningZooError, match=r"cannot load model 'some-org/not-downloaded' \(hub id\).*hf download "
                                              r"some-org/not-downloaded --local-dir DIR.*--model DIR"):
        load_vlm("some-org/not-downloaded", device="cpu")


def test_a_model_that_cannot_be_loaded_stops_the_sweep_at_once_and_writes_nothing(tmp_path, offline_hub):
    states = []
    suite = make_suite("some-org/not-downloaded", ["none", "fastv", "random"], limit=2)
    with pytest.raises(SetupError) as stopped:
        sweep(suite, tmp_path, on_cell=lambda cell, state: states.append(state)).run()
    message = str(stopped.value)
    # Found before any model loads: the hub is off and the model is in no cache.
    assert "the Hugging Face hub cannot be used (HF_HUB_OFFLINE is set)" in message
    assert "not in this machine's cache: model some-org/not-downloaded." in message and "--model FOLDER" in message
    assert states == []  # no cell was tried
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_stopped_by_a_model_keeps_the_cells_finished_before(tiny_testbed_model, tmp_path, offline_hub):
    broken = tmp_path / "broken-model"  # its config passes the check before the sweep; it has no weights to load
    broken.mkdir()
    shutil.copy(Path(tiny_testbed_model) / "config.json", broken / "config.json")
    data = make_suite(tiny_testbed_model, ["none"], limit=2).model_dump()
    suite = validate_suite({**data, "models": [tiny_testbed_model, str(broken)]}, origin="test")
    output = tmp_path / "results"
    with pytest.raises(SetupError, match=r"(?s)cannot load model .*cell 2 of 2\); nothing was written for it .* the 1 finished cells"):
        sweep(suite, output).run()
    (folder,) = [path for path in output.iterdir() if path.is_dir()]
    assert results.status(folder) == "finished" and tiny_testbed_model.strip("/").split("/")[-1] in folder.name


def test_a_hub_dataset_that_cannot_be_reached_stops_the_sweep(tiny_testbed_model, tmp_path, offline_hub):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: some-org/not-downloaded-dataset\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    suite = make_suite(tiny_testbed_model, ["none", "fastv"], tasks=["hub_task"], task_paths=[str(tasks)], limit=2)
    with pytest.raises(SetupError) as stopped:
        sweep(suite, tmp_path / "results").run()
    message = str(stopped.value)
    assert "not in this machine's cache: dataset some-org/not-downloaded-dataset (task hub_task)" in message
    assert "--data DIR" in message and "HF_HUB_OFFLINE=1" in message
    assert not (tmp_path / "results").exists()  # found before anything was made


def test_result_folders_follow_the_users_umask(tmp_path):
    cell = results.Cell(model="m", task="t", strategy="none", params={}, budget=1.0, limit=None, batch_size=1,
                        dtype="auto", device_type="cpu")
    previous = os.umask(0o022)
    try:
        folder = results.write_cell(tmp_path, cell, {"cell": cell.as_dict()}, error={"error": "x"})
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / results.CONFIG).stat().st_mode & 0o777 == 0o644


def test_an_unknown_task_stops_before_anything_is_written(tiny_testbed_model, tmp_path):
    with pytest.raises(PruningZooError, match=r"unknown task 'testbd'; did you mean 'testbed'\?"):
        sweep(make_suite(tiny_testbed_model, ["none"], tasks=["testbd"]), tmp_path / "out").run()
    assert not (tmp_path / "out").exists()


def test_the_model_is_exposed_through_lmms_evals_entry_points(tiny_testbed_model):
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    model_class = registry.get_model_class("pruning_zoo")
    assert model_class is PrunedVLM
    lm = model_class.create_from_arg_string(f"pretrained={tiny_testbed_model},strategy=fastv,budget=64,k=3",
                                            {"batch_size": 2, "device": "cpu"})
    assert lm.strategy.params.k == 3 and lm.budget == 64 and lm.batch_size == 2


class Request:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_matches_a_direct_computation(tiny_testbed_model):
    from PIL import Image

    lm = PrunedVLM(pretrained=tiny_testbed_model, device="cpu", batch_size=2)
    images = [Image.new("RGB", (336, 336), color) for color in ("red", "blue", "green")]
    docs = [{"q": "is there a red circle ?", "a": " yes"}, {"q": "what colour is the square ?", "a": " blue"},
            {"q": "how many circle objects are there ?", "a": " two three"}]
    lm.task_dict = {"t": {"test": docs}}
    requests = [Request(d["q"], d["a"], lambda doc, i=i: [images[i]], i, "t", "test") for i, d in enumerate(docs)]
    batched = lm.loglikelihood(requests)
    model, processor = lm.loaded.model, lm.loaded.processor
    for (logprob, greedy), doc, image in zip(batched, docs, images):
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["q"]}]}],
                                               add_generation_prompt=True, tokenize=False)
        full = processor(text=[prompt + doc["a"]], images=[image], return_tensors="pt")
        count = full["input_ids"].shape[1] - processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**full).logits[0, -count - 1 : -1].log_softmax(-1)
        targets = full["input_ids"][0, -count:]
        assert logprob == pytest.approx(float(logits.gather(1, targets[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == targets).all())
    assert [m["entering_llm"] for m in lm.document_measurements.values()] == [576] * 3


def test_the_latency_example_is_the_tasks_first_document_whatever_the_batch_order(tiny_testbed_model):
    """Batches run longest prompt first; the compiled mode must still time the task's first document, so that
    one process and several (each answering a share) time the same one."""
    from PIL import Image

    lm = PrunedVLM(pretrained=tiny_testbed_model, device="cpu", batch_size=1, strategy="none")
    lm.task_dict = {"t": {"test": [{}, {}, {}]}}
    questions = ["is it red ?", "is there a red circle in the left half of the image ?", "what is it ?"]
    images = [Image.new("RGB", (336, 336), color) for color in ("red", "green", "blue")]
    lm.generate_until([Request(q, {"max_new_tokens": 1}, lambda doc, i=i: [images[i]], i, "t", "test")
                       for i, q in enumerate(questions)])
    key, prompt, example_images = lm.latency_example
    assert key == ("t", 0) and "is it red ?" in prompt and example_images[0].getpixel((0, 0)) == (255, 0, 0)


def test_lmms_evals_clean_up_keeps_the_sweeps_model(tiny_testbed_model):
    lm = PrunedVLM(pretrained=tiny_testbed_model, device="cpu", strategy="none")
    model = lm.loaded.model
    lm.clean()  # lmms-eval calls it after each task; the next cell reuses the model
    assert lm.loaded.model is model


def test_the_compiled_latency_times_copies_of_the_first_document(tiny_testbed_model):
    """On a GPU the leaderboard's latency is the compiled mode's: a batch of copies of the first document
    answered, run as the segmented prefill. Here (CPU) the same segments run eagerly."""
    from PIL import Image

    from pruning_zoo.eval.metrics import with_compiled_latency

    lm = PrunedVLM(pretrained=tiny_testbed_model, device="cpu", batch_size=3, strategy="fastv", budget="64")
    assert "error" in lm.compiled_latency()  # nothing answered yet
    lm.task_dict = {"t": {"test": [{"q": "is there a red circle ?"}]}}
    image = Image.new("RGB", (336, 336), "red")
    lm.generate_until([Request("is there a red circle ?", {"max_new_tokens": 2}, lambda doc: [image], 0, "t", "test")])
    compiled = lm.compiled_latency(repeats=2)
    assert compiled["time_to_first_token_ms"] > compiled["selection_ms"] > 0
    eager = {"time_to_first_token_ms": 9.0, "selection_ms": 1.0, "selection_share_of_ttft": 0.11, "batch_size": 3,
             "mode": "eager", "decode_ms_per_token": 2.0, "how": "Per batch of up to 3 documents ..."}
    merged = with_compiled_latency(eager, compiled)
    assert merged["mode"] == "compiled" and merged["eager"]["time_to_first_token_ms"] == 9.0  # no fusion on CPU
    fused = with_compiled_latency(eager, {**compiled, "fusion": "inductor"})
    assert fused["mode"] == "compiled (inductor)" and "fused by torch.compile (inductor)" in fused["how"]
    assert merged["time_to_first_token_ms"] == compiled["time_to_first_token_ms"] and merged["decode_ms_per_token"] == 2.0
    assert with_compiled_latency(eager, {"error": "x"}) == {**eager, "compiled_error": "x"}


STRATEGY_SOURCE = '''
import pruning_zoo
from pruning_zoo.strategy.budget import BudgetMeaning
from pruning_zoo.strategy import PruningStrategy, Stage


class Norm(PruningStrategy):
    """Keeps the tokens of largest L2 norm."""

    name = "norm"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        return ctx.tokens.float().norm(dim=-1) * SIGN


class Plugin:
    @pruning_zoo.hookimpl
    def register_strategies(self, register):
        register(Norm)
'''


def load_module(path: Path, monkeypatch):
    import importlib.util
    import sys

    name = f"edited_strategy_{abs(hash(path.read_text()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # as an imported plugin module is
    spec.loader.exec_module(module)
    return module


def test_a_result_made_by_other_strategy_code_is_never_reused(tiny_testbed_model, tmp_path, monkeypatch):
    """The strategy's source is part of its cells' identity: after an edit the same command evaluates again (the old
    folder is kept and named), and each result records which code made it."""
    source = tmp_path / "norm_strategy.py"
    results_folder = tmp_path / "results"
    runs = []
    for sign in ("1.0", "-1.0"):  # the author flips the score: the largest norms, then the smallest
        source.write_text(STRATEGY_SOURCE.replace("SIGN", sign))
        plugins.reset()
        plugins.plugin_manager().register(load_module(source, monkeypatch).Plugin(), name="norm-plugin")
        try:
            runner = sweep(make_suite(tiny_testbed_model, ["norm"], limit=3), results_folder)
            runs.append((runner.run(), runner.superseded))
        finally:
            plugins.reset()
    (first, _), (second, superseded) = runs
    assert [o.status for o in first] == ["finished"] and [o.status for o in second] == ["finished"]
    assert first[0].folder != second[0].folder and superseded == [first[0].folder]
    assert sorted(p for p in results_folder.iterdir() if p.is_dir()) == sorted([first[0].folder, second[0].folder])
    codes = [read(o[0].folder, results.CONFIG)["strategy_code"] for o in (first, second)]
    assert codes[0]["file"] == codes[1]["file"] == str(source) and codes[0]["source_sha256"] != codes[1]["source_sha256"]
    assert codes[0]["distribution"] is None  # a plugin registered by hand, from no installed distribution
    builtin = sweep(make_suite(tiny_testbed_model, ["fastv"]), tmp_path / "other").strategy_code["fastv"]
    assert builtin["distribution"] == "pruning-zoo" and builtin["module"].endswith("fastv")
