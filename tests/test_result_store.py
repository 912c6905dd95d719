"""A damaged result store loses no finished work: a resume sets a damaged cell aside (renamed, never deleted),
says what was wrong and evaluates it again while every sound cell stays finished; the leaderboard renders the
sound cells and lists the damaged ones."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pruning_zoo.cli import app
from pruning_zoo.eval import results
from pruning_zoo.eval.runner import Sweep
from pruning_zoo.eval.suite import validate_suite
from pruning_zoo.leaderboard.build import build


def suite_for(model: str):
    return validate_suite({"name": "t", "tasks": ["testbed"], "models": [model], "limit": 2, "batch_size": 2,
                           "strategies": {"none": {}, "fastv": {}}, "budgets": [64]}, origin="t")


@pytest.fixture
def store(tiny_testbed_model, tmp_path):
    """A finished two-cell store: (suite, output, {strategy: folder})."""
    suite = suite_for(tiny_testbed_model)
    outcomes = Sweep(suite, tmp_path / "results", device="cpu").run()
    assert [o.status for o in outcomes] == ["finished", "finished"]
    return suite, tmp_path / "results", {o.cell.strategy: o.folder for o in outcomes}


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / results.METRICS).read_text())


#: How a metrics.json gets damaged -> a word the reason must contain.
DAMAGES = {
    "garbage bytes": (lambda m: b"\xff\xfe\x00garbage", "cannot be read as JSON"),
    "null fields": (lambda m: {**m, "scores": None, "latency": None}, "scores"),
    "a string score": (lambda m: {**m, "scores": {"accuracy": "0.9"}}, "scores.accuracy"),
    "a list for an object": (lambda m: [m], "(top level)"),
    "no latency": (lambda m: {k: v for k, v in m.items() if k != "latency"}, "latency"),
    "a newer schema": (lambda m: {**m, "schema": results.SCHEMA_VERSION + 1}, "schema"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_a_resume_sets_a_damaged_cell_aside_and_evaluates_it_again(store, kind):
    suite, output, folders = store
    damaged = folders["fastv"]
    change, word = DAMAGES[kind]
    written = change(metrics_of(damaged))
    (damaged / results.METRICS).write_bytes(written if isinstance(written, bytes) else json.dumps(written).encode())
    before = (damaged / results.METRICS).read_bytes()

    sweep = Sweep(suite, output, device="cpu")
    outcomes = sweep.run()
    assert [o.status for o in outcomes] == ["skipped", "finished"]  # the sound cell stays, the damaged one reruns
    ((aside, problem),) = sweep.set_aside
    assert aside.name == damaged.name + ".corrupt" and word in problem and results.METRICS in problem
    assert (aside / results.METRICS).read_bytes() == before  # kept as it was, for whoever wants to look
    assert results.damage(damaged) is None and metrics_of(damaged)["schema"] == results.SCHEMA_VERSION
    # A third run trusts both cells and leaves the set-aside folder alone.
    assert [o.status for o in Sweep(suite, output, device="cpu").run()] == ["skipped", "skipped"]


def test_the_leaderboard_renders_the_sound_cells_and_lists_the_damaged(store, tmp_path):
    _, output, folders = store
    (folders["fastv"] / results.METRICS).write_text('{"documents": "two"}')
    damaged = []
    page, frame = build([output], tmp_path / "board", damaged)
    assert list(frame["strategy"]) == ["none"]
    assert [folder for folder, _ in damaged] == [folders["fastv"]]
    text = page.read_text()
    assert "## Damaged results, left out" in text and f"`{folders['fastv'].name}`: metrics.json" in text
    result = CliRunner().invoke(app, ["leaderboard", str(output), "-o", str(tmp_path / "board2")],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "left out damaged result" in result.output and "1 damaged result folders left out" in result.output


def test_a_run_says_which_results_it_set_aside(store, tmp_path):
    _, output, folders = store
    (folders["none"] / results.CONFIG).write_text("[]")
    result = CliRunner().invoke(app, ["run", "--suite", "testbed", "--model", str(store[0].models[0]), "--limit", "2",
                                      "--batch-size", "2", "--strategies", "none,fastv", "--budgets", "64",
                                      "--device", "cpu", "--output", str(output)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"set aside a damaged result, evaluated again: {folders['none']}.corrupt (config.json" in text
