"""A sweep split across two processes (torchrun, gloo on CPU) gives the results of one process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

from pruning_zoo import results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sweep_command(model: str, output: Path) -> list[str]:
    return ["-m", "pruning_zoo.cli", "run", "--suite", "testbed", "--model", model, "--strategies", "none,fastv,random",
            "--budgets", "64", "--limit", "7", "--batch-size", "2", "--device", "cpu", "--output", str(output)]


def read_cells(output: Path) -> dict:
    cells = {}
    for folder in sorted(output.iterdir()):
        metrics = json.loads((folder / results.METRICS).read_text())
        samples = sorted(results.read_samples(folder), key=lambda row: row["doc_id"])
        cells[folder.name] = (metrics["scores"], metrics["visual_tokens"]["average_per_layer"], metrics["evidence_recall"],
                              metrics["flops"]["llm_prefill_2ndm"],
                              [(row["doc_id"], row["prediction"], row["entering_llm"]) for row in samples])
    return cells


def test_two_gloo_processes_give_the_results_of_one(tiny_testbed_model, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *sweep_command(tiny_testbed_model, one)], check=True, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port())]
    done = subprocess.run([*launch, *sweep_command(tiny_testbed_model, two)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    # random too: its draw follows the document, not the process or the order
    assert read_cells(one) == read_cells(two)
    config = json.loads(next((two).glob("*fastv*/config.json")).read_text())
    assert config["processes"] == 2
    assert len(read_cells(two)["" + next(two.glob("*fastv*")).name][4]) == 7  # every document, once
    again = subprocess.run([*launch[:-1], str(free_port()), *sweep_command(tiny_testbed_model, two)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "0 cells evaluated, 3 already finished" in " ".join(again.stdout.split())
