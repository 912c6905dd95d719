"""A sweep split across two processes (torchrun, gloo on CPU) gives the results of one process."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from pruning_zoo.eval import results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(log_dir: Path) -> list[str]:
    """Two processes on a fresh local port, logging under the test's own folder (by default torchrun leaves a
    /tmp/torchelastic_* folder behind after every launch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "--log-dir", str(log_dir)]


def sweep_command(model: str, output: Path) -> list[str]:
    return ["-m", "pruning_zoo.cli", "run", "--suite", "testbed", "--model", model, "--strategies", "none,fastv,random",
            "--budgets", "64", "--limit", "7", "--batch-size", "2", "--device", "cpu", "--output", str(output),
            "--compiled-latency"]


def read_cells(output: Path) -> dict:
    cells = {}
    for folder in sorted(output.iterdir()):
        if not (folder / results.METRICS).exists():  # a failed cell
            continue
        metrics = json.loads((folder / results.METRICS).read_text())
        samples = sorted(results.read_samples(folder), key=lambda row: row["doc_id"])
        cells[folder.name] = (metrics["scores"], metrics["visual_tokens"]["average_per_layer"], metrics["evidence_recall"],
                              metrics["flops"]["llm_prefill_2ndm"],
                              [(row["doc_id"], row["prediction"], row["entering_llm"]) for row in samples])
    return cells


def test_two_gloo_processes_give_the_results_of_one(tiny_testbed_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *sweep_command(tiny_testbed_model, one)], check=True, capture_output=True)
    left_before = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    done = subprocess.run([*torchrun(tmp_path / "logs"), *sweep_command(tiny_testbed_model, two)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert set(Path(tempfile.gettempdir()).glob("torchelastic_*")) == left_before  # nothing left in /tmp
    # random too: its draw follows the document, not the process or the order
    assert read_cells(one) == read_cells(two)
    config = json.loads(next((two).glob("*fastv*/config.json")).read_text())
    assert config["processes"] == 2
    # the last process timed the compiled mode while the first wrote the results
    assert {"evaluate", "metrics", "compiled_latency", "total"} <= set(config["seconds"])
    assert [set(process) for process in config["seconds"]["processes"]] == [{"evaluate", "prepare", "generate"}] * 2
    for output in (one, two):
        latency = json.loads(next(output.glob("*fastv*/metrics.json")).read_text())["latency"]
        assert latency["mode"] == "compiled" and latency["time_to_first_token_ms"] > 0 and "compiled_error" not in latency
    assert len(read_cells(two)["" + next(two.glob("*fastv*")).name][4]) == 7  # every document, once
    again = subprocess.run([*torchrun(tmp_path / "logs"), *sweep_command(tiny_testbed_model, two)], capture_output=True, text=True)
    assert again.returncode == 0 and "0 cells evaluated, 3 already finished" in " ".join(again.stdout.split())


DRIVER = '''
import os, sys
import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, Stage


class FailsOnRankOne(PruningStrategy):
    """Fails on the second process only, while FAIL_ON_RANK_ONE is set (dies while DIE_ON_RANK_ONE is)."""
    name = "fails-on-rank-one"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def plan(self, budget, num_visual, num_layers):
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx):
        if os.environ.get("FAIL_ON_RANK_ONE") and os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1 fails here")
        if os.environ.get("DIE_ON_RANK_ONE") and os.environ.get("RANK") == "1":
            os._exit(3)  # the process dies (killed, out of memory...) instead of raising
        return ctx.tokens.float().norm(dim=-1)


class Plugin:
    @pruning_zoo.hookimpl
    def register_strategies(self, register):
        register(FailsOnRankOne)


plugins.plugin_manager().register(Plugin(), name="fails-on-rank-one")
from pruning_zoo.cli import main
sys.argv = ["pruning-zoo", *sys.argv[1:]]
main()
'''


def launcher(tiny_testbed_model, tmp_path):
    """(output folder, launch(**env)): a torchrun sweep of none, fails-on-rank-one and fastv."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    output = tmp_path / "results"
    command = sweep_command(tiny_testbed_model, output)[2:]  # "run ...", without "-m pruning_zoo.cli"
    command[command.index("--strategies") + 1] = "none,fails-on-rank-one,fastv"

    def launch(**env):
        return subprocess.run([*torchrun(tmp_path / "logs"), str(driver), *command], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=600)  # a hang fails the test instead of blocking it

    return output, launch


def test_a_rank_that_fails_leaves_the_other_cells_intact_and_resumable(tiny_testbed_model, tmp_path):
    output, launch_with = launcher(tiny_testbed_model, tmp_path)

    def launch(fail: bool):
        return launch_with(FAIL_ON_RANK_ONE="1" if fail else "")

    first = launch(fail=True)
    # The sweep goes on past the failed cell and exits 1 to say a cell failed.
    assert first.returncode == 1 and "2 cells evaluated, 0 already finished (skipped), 1 failed" in " ".join(
        first.stdout.split()), first.stderr[-3000:] + first.stdout[-3000:]
    statuses = {folder.name.split("__")[2]: sorted(p.name for p in folder.iterdir()) for folder in output.iterdir() if folder.is_dir()}
    assert statuses["fails-on-rank-one"] == [results.CONFIG, results.ERROR]
    assert "rank 1 fails here" in (next(output.glob("*fails-on-rank-one*")) / results.ERROR).read_text()
    finished = read_cells(output)
    assert len(finished) == 2 and all(len(cell[4]) == 7 for cell in finished.values())  # every document, both cells
    second = launch(fail=False)
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    assert "1 cells evaluated, 2 already finished" in " ".join(second.stdout.split())
    again = read_cells(output)
    assert {name: again[name] for name in finished} == finished and len(again) == 3


def test_a_rank_that_dies_stops_the_sweep_and_a_rerun_finishes_it(tiny_testbed_model, tmp_path):
    """A process that dies cannot record anything: torchrun stops the others (none waits forever), the cells
    finished before stay as they are, and the same command again evaluates the rest."""
    output, launch = launcher(tiny_testbed_model, tmp_path)
    died = launch(DIE_ON_RANK_ONE="1")
    assert died.returncode != 0
    finished = read_cells(output)
    assert list(finished) == [next(output.glob("*__none__*")).name] and len(next(iter(finished.values()))[4]) == 7
    assert not list(output.glob("*fastv*"))
    again = launch()
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert "2 cells evaluated, 1 already finished" in " ".join(again.stdout.split())
    cells = read_cells(output)
    assert len(cells) == 3 and {name: cells[name] for name in finished} == finished
