"""Faults a sweep must survive: kill -9 in the middle of a cell and in the middle of writing one, SIGINT and
SIGTERM, a strategy that raises on one batch, and a second run writing the same output folder. Real processes
where the fault is a process's death; each fault is placed at a fixed point (the process kills itself there), so
no test waits on a clock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pruning_zoo.cli import app
from pruning_zoo.eval import results

#: Runs `pruning-zoo ARGS...` with one fault placed: FAULT WHERE ARGS... (see `faults` below).
DRIVER = r'''
import os, signal, sys
from pruning_zoo.eval import results
from pruning_zoo.cli import app
from pruning_zoo.eval.runner import Sweep

fault, where, args = sys.argv[1], sys.argv[2], sys.argv[3:]
evaluate, write = Sweep.evaluate, results.durable_write_text

def evaluate_with_fault(self, cell, lm):
    if cell.strategy == where:
        if fault == "kill-in-cell":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault in ("sigint-in-cell", "sigterm-in-cell"):
            os.kill(os.getpid(), signal.SIGINT if fault == "sigint-in-cell" else signal.SIGTERM)
        if fault == "hold-in-cell":  # holds the output folder until the test writes a line
            print("holding", flush=True)
            sys.stdin.readline()
    return evaluate(self, cell, lm)

def write_with_fault(path, text):
    if fault == "kill-in-write" and path.name == results.METRICS and f"__{where}__" in path.parent.name:
        with open(path, "w") as file:  # half the file on disk, then the process dies
            file.write(text[: len(text) // 2])
            file.flush()
            os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, text)

Sweep.evaluate, results.durable_write_text = evaluate_with_fault, write_with_fault
app(args, prog_name="pruning-zoo")
'''

STRATEGIES = ["none", "fastv", "random"]


def sweep_args(model: str, output: Path) -> list[str]:
    return ["run", "--suite", "testbed", "--model", model, "--strategies", ",".join(STRATEGIES), "--budgets", "64",
            "--limit", "2", "--device", "cpu", "--output", str(output)]


def run_with_fault(fault: str, where: str, args: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, fault, where, *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}, **options)


def cells(output: Path) -> dict[str, str]:
    """Strategy -> status of each cell folder under `output` (temporaries and set-aside folders left out)."""
    found = {}
    for folder in output.iterdir():
        if folder.is_dir() and not folder.name.startswith(results.TEMPORARY_PREFIX):
            found[json.loads((folder / results.CONFIG).read_text())["cell"]["strategy"]] = results.status(folder)
    return found


def resume(args: list[str]):
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("fault", ["kill-in-cell", "kill-in-write"])
def test_kill_9_loses_no_finished_cell_and_leaves_nothing_a_resume_trips_on(fault, tiny_testbed_model, tmp_path,
                                                                           offline_hub):
    output = tmp_path / "results"
    args = sweep_args(tiny_testbed_model, output)
    killed = run_with_fault(fault, "fastv", args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cells(output) == {"none": "finished"}  # the cell before the kill, whole; nothing of the killed one
    left = [p.name for p in output.iterdir() if p.name.startswith(results.TEMPORARY_PREFIX)]
    assert left or fault == "kill-in-cell"  # a kill mid-write leaves its temporary folder, which a resume removes
    finished_before = (output / next(p.name for p in output.iterdir() if p.is_dir() and "__none__" in p.name))
    before = (finished_before / results.METRICS).read_bytes()
    text = resume(args)
    assert "2 cells evaluated, 1 already finished (skipped), 0 failed" in text
    assert cells(output) == {name: "finished" for name in STRATEGIES}
    assert (finished_before / results.METRICS).read_bytes() == before
    assert not [p for p in output.iterdir() if p.name.startswith(results.TEMPORARY_PREFIX)]


@pytest.mark.parametrize("fault, name", [("sigint-in-cell", "SIGINT"), ("sigterm-in-cell", "SIGTERM")])
def test_an_interrupt_says_what_finished_and_how_to_resume(fault, name, tiny_testbed_model, tmp_path, offline_hub):
    output = tmp_path / "results"
    args = sweep_args(tiny_testbed_model, output)
    stopped = run_with_fault(fault, "fastv", args)
    text = " ".join(stopped.stderr.split())
    assert stopped.returncode == 130, (name, stopped.stdout, stopped.stderr)
    assert "interrupted: 1 cells evaluated in this run and 0 finished before are stored in" in text
    assert "2 of 3 cells are not done" in text and "(testbed fastv 64) was discarded" in text
    assert "Rerun the same command to resume" in text and "Traceback" not in stopped.stderr
    assert cells(output) == {"none": "finished"}
    assert "2 cells evaluated, 1 already finished (skipped), 0 failed" in resume(args)


def test_testbed_evaluate_interrupted_says_what_finished(tmp_path):
    args = ["testbed", "evaluate", "--strategies", "none,fastv,random", "--limit", "4", "--output",
            str(tmp_path / "r.json")]
    code = ("import os, signal, sys\nfrom pruning_zoo.strategies import fastv\nfrom pruning_zoo.cli import app\n"
            "def stop(self, contexts):\n    os.kill(os.getpid(), signal.SIGINT)\n    return []\n"
            "fastv.FastV.select_images = stop\napp(sys.argv[1:], prog_name='pruning-zoo')\n")
    stopped = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             env={**__import__("os").environ, "COLUMNS": "200"})
    text = " ".join(stopped.stderr.split())
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted while evaluating fastv: 1 of 3 strategies finished (none)" in text
    assert "--strategies fastv,random" in text and "nothing was written to" in text
    assert "Traceback" not in stopped.stderr and not (tmp_path / "r.json").exists()


def test_a_strategy_that_raises_on_one_batch_fails_that_cell_only(tiny_testbed_model, tmp_path, offline_hub,
                                                                monkeypatch):
    from pruning_zoo.strategies import fastv

    calls = []
    select = fastv.FastV.select_images

    def raises_on_the_second_batch(self, contexts):
        calls.append(len(contexts))
        if len(calls) == 2:
            raise RuntimeError("selection broke on this batch")
        return select(self, contexts)

    monkeypatch.setattr(fastv.FastV, "select_images", raises_on_the_second_batch)
    output = tmp_path / "results"
    args = [*sweep_args(tiny_testbed_model, output), "--limit", "4", "--batch-size", "2"]  # later options win
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "2 cells evaluated, 0 already finished (skipped), 1 failed" in text
    assert "failed testbed fastv 64: " in text and "selection broke on this batch" in text
    assert cells(output) == {"none": "finished", "fastv": "failed", "random": "finished"}
    error = json.loads(next(output.glob(f"*__fastv__*/{results.ERROR}")).read_text())
    assert "selection broke on this batch" in error["error"] and "Traceback" in error["traceback"]


def test_two_runs_on_one_output_folder_the_second_is_refused(tiny_testbed_model, tmp_path, offline_hub):
    """A first run holds the folder (stopped inside its second cell); a second run of the same folder is refused
    at once with who holds it, and the first run then finishes unharmed."""
    output = tmp_path / "results"
    args = sweep_args(tiny_testbed_model, output)
    first = subprocess.Popen([sys.executable, "-c", DRIVER, "hold-in-cell", "fastv", *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**__import__("os").environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
    try:
        for line in first.stdout:  # blocks until the first run holds the folder
            if line.strip() == "holding":
                break
        second = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        text = " ".join(second.output.split())
        assert second.exit_code == 1, second.output
        assert f"another pruning-zoo run is writing to {output} (process {first.pid}" in text
        assert "give this run another --output" in text
        out, err = first.communicate("go\n", timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert cells(output) == {name: "finished" for name in STRATEGIES}
    assert "0 cells evaluated, 3 already finished (skipped)" in resume(args)  # the lock went with the first run
