"""The leaderboard is a pure function of stored results: fixture results give a checked-in markdown page."""

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pruning_zoo.cli import app
from pruning_zoo.errors import PruningZooError
from pruning_zoo.leaderboard.build import build

FIXTURES = Path(__file__).parent / "fixtures"
RESULTS = [FIXTURES / "results", FIXTURES / "results-rerun"]


def test_the_leaderboard_of_fixture_results_matches_the_expected_page(tmp_path):
    page, frame = build(RESULTS, tmp_path)
    assert page.read_text() == (FIXTURES / "leaderboard.md").read_text()
    # Failed cells and what an interrupted run left are not results; a cell stored twice counts once (the latest).
    assert len(frame) == 7 and "transprune" not in set(frame["strategy"])
    latest = frame[(frame["strategy"] == "fastv") & (frame["budget"] == "64") & (frame["device"].str.startswith("NVIDIA"))]
    assert latest["score"].tolist() == [0.596]
    assert len(pd.read_csv(tmp_path / "leaderboard.csv")) == 7
    plots = sorted((tmp_path / "plots").iterdir())
    assert len(plots) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_devices_never_share_a_latency_column(tmp_path):
    page, _ = build(RESULTS, tmp_path)
    sections = page.read_text().split("\n## ")[1:]
    assert len(sections) == 2
    assert sum("NVIDIA H100" in s for s in sections) == 1 and sum("CPU Example" in s for s in sections) == 1


def test_the_leaderboard_does_not_depend_on_the_order_of_its_inputs(tmp_path):
    first, _ = build(RESULTS, tmp_path / "a")
    second, _ = build(list(reversed(RESULTS)), tmp_path / "b")
    assert first.read_text() == second.read_text()


def test_no_results_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruningZooError, match="no finished results under"):
        build([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_leaderboard_command(tmp_path):
    result = CliRunner().invoke(app, ["leaderboard", *map(str, RESULTS), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "leaderboard.md").read_text() == (FIXTURES / "leaderboard.md").read_text()


def test_fused_and_unfused_compiled_latencies_never_share_a_table(tmp_path):
    """GPU cells timed in the compiled mode, one with torch.compile's fusion and one without, land in two tables,
    each saying how it was timed."""
    import json
    import shutil

    results = tmp_path / "results"
    shutil.copytree(FIXTURES / "results", results)
    gpu = sorted(p for p in results.iterdir() if (p / "metrics.json").exists() and "NVIDIA" in (p / "metrics.json").read_text())
    for folder, mode in zip(gpu[:2], ["compiled", "compiled (inductor)"]):
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics["latency"]["mode"] = mode
        (folder / "metrics.json").write_text(json.dumps(metrics))
    page = build([results], tmp_path / "board")[0].read_text()
    titles = [line for line in page.splitlines() if line.startswith("## ")]
    assert sum("compiled latency" in t for t in titles) == 1 and sum("compiled (inductor) latency" in t for t in titles) == 1
    assert "CUDA-graph segments fused by torch.compile (inductor)" in page


def test_plots_use_the_tables_flops_convention_and_tell_strategies_apart(tmp_path, monkeypatch):
    import matplotlib.axes

    from pruning_zoo.leaderboard import build as leaderboard

    labels, lines = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda axis, text, *a, **k: labels.append(text))
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda axis, *a, **k: lines.append((k["label"], k["color"], k["marker"])) or real_plot(axis, *a, **k))
    page, frame = build(RESULTS, tmp_path)
    header = next(line for line in page.read_text().splitlines() if line.startswith("| budget"))
    assert "LLM prefill TFLOPs (2ndm)" in header and "LLM prefill TFLOPs (2ndm) per document" in labels
    styles = {label: (colour, marker) for label, colour, marker in lines}
    assert len(set(styles.values())) == len(styles) >= 3  # each strategy its own colour and marker, in every plot
    assert len(set(lines)) == len(styles)
    many = pd.DataFrame({"strategy": [f"s{i}" for i in range(12)], "params": ["defaults"] * 12})
    assert len({(s["color"], s["marker"]) for s in leaderboard.strategy_styles(many).values()}) == 12
