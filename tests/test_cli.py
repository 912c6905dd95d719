import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pruning_zoo.cli import app

WIDE = {"COLUMNS": "250"}


def invoke(*args):
    return CliRunner().invoke(app, list(args), env=WIDE)


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("list", "run", "leaderboard"):
        assert command in result.output


def test_list_shows_strategies_families_and_suites():
    result = invoke("list")
    assert result.exit_code == 0, result.output
    for name in ("none", "random", "pool", "fastv", "llava_next", "Qwen2VLForConditionalGeneration", "image-vqa"):
        assert name in result.output
    fastv = next(line for line in result.output.splitlines() if line.startswith("│ fastv"))
    assert "after pruning" in fastv and "after layer 1: keep 64" in fastv and "pruning-zoo 0.1.0" in fastv


def test_run_dry_run_prints_the_cells():
    result = invoke("run", "--suite", "image-vqa", "--strategies", "none,fastv", "--budgets", "64,0.5",
                    "--tasks", "pope", "--param", "fastv.k=3", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "3 cells" in result.output  # none once, fastv at two budgets
    assert "k=3" in result.output


def test_run_evaluates_a_suite_and_resumes(tmp_path):
    import tiny_models

    model = tiny_models.testbed_like(tmp_path / "model")
    args = ["run", "--suite", "testbed", "--model", model, "--strategies", "none,fastv", "--budgets", "64",
            "--limit", "2", "--device", "cpu", "--output", str(tmp_path / "results")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "2 cells evaluated, 0 already finished (skipped), 0 failed" in result.output
    assert len(list((tmp_path / "results").iterdir())) == 2
    again = invoke(*args)
    assert again.exit_code == 0 and "0 cells evaluated, 2 already finished (skipped)" in again.output


def test_run_names_an_unknown_task_before_evaluating(tmp_path):
    result = invoke("run", "--suite", "testbed", "--tasks", "testbd", "--device", "cpu", "--output", str(tmp_path))
    assert result.exit_code == 2
    assert "unknown task 'testbd'; did you mean 'testbed'?" in result.output


def test_run_without_lmms_eval_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", None)  # what an environment without it gives
    result = invoke("run", "--suite", "testbed", "--device", "cpu", "--output", str(tmp_path))
    assert result.exit_code == 2
    assert "pip install -e '.[eval]'" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--suite", "image-vq"], "unknown suite 'image-vq'; did you mean 'image-vqa'? known:"),
        (["run", "--suite", "missing.yaml"], "suite file missing.yaml does not exist"),
        (["run", "--suite", "image-vqa", "--strategies", "fastV"], "unknown strategy 'fastV'; did you mean 'fastv'?"),
        (["run", "--suite", "image-vqa", "--budgets", "64,-1"], "budget -1 must keep at least 1"),
        (["run", "--suite", "image-vqa", "--param", "fastv.k=zero"], "invalid value 'zero' for parameter fastv.k"),
        (["run", "--suite", "image-vqa", "--param", "fastvk=3"], "is not STRATEGY.PARAMETER=VALUE"),
        (["run", "--suite", "image-vqa", "--strategies", "none", "--param", "fastv.k=3"],
         "--param names strategy 'fastv', which this run does not include"),
        (["leaderboard", "no/such/folder"], "results folder no/such/folder does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_with_a_nonzero_exit(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_run_refuses_an_output_that_is_a_file(tmp_path):
    (tmp_path / "results").write_text("")
    result = invoke("run", "--suite", "image-vqa", "--output", str(tmp_path / "results"), "--dry-run")
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "pruning-zoo"
    result = subprocess.run([str(script), "run", "--suite", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown suite 'nope'" in result.stderr
