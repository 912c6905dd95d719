import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pruning_zoo.cli import app

WIDE = {"COLUMNS": "250"}


def cell_folders(output: Path) -> list[Path]:
    """The cell folders of a results folder (not its lock files)."""
    return [path for path in output.iterdir() if path.is_dir()]


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
    fastv = next(line for line in result.output.splitlines() if line.startswith("fastv "))
    assert "after pruning" in fastv and "after layer 1: keep 64" in fastv and "pruning-zoo 0.1.0" in fastv


def test_run_dry_run_prints_the_cells_and_checks_them(tiny_testbed_model, tmp_path):
    result = invoke("run", "--suite", "testbed", "--model", tiny_testbed_model, "--strategies", "none,fastv",
                    "--budgets", "64,0.5", "--param", "fastv.k=3", "--output", str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "3 cells" in result.output  # none once, fastv at two budgets
    assert "k=3" in result.output and "ready to run" in result.output
    assert not (tmp_path / "out").exists()  # a dry run makes nothing


def test_a_dry_run_of_a_suite_that_cannot_run_here_shows_its_cells_and_says_why(offline_hub):
    result = invoke("run", "--suite", "image-vqa", "--strategies", "none,fastv", "--budgets", "64,0.5",
                    "--tasks", "pope", "--param", "fastv.k=3", "--dry-run")
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output  # the options are right; what they need is not here
    assert "3 cells" in text and "k=3" in text
    assert "these are not in this machine's cache: model llava-hf/llava-1.5-7b-hf; dataset lmms-lab-encoder/POPE" in text


def test_a_dry_run_checks_plans_against_the_model(tiny_testbed_model, tmp_path):
    result = invoke("run", "--suite", "testbed", "--model", tiny_testbed_model, "--strategies", "none,fastv,visionzip",
                    "--budgets", "577", "--param", "fastv.k=9", "--param", "visionzip.layer=5", "--dry-run",
                    "--output", str(tmp_path))
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "the sweep cannot start (3 problems)" in text
    assert "budget 577 on " in text and "larger than the 576 visual tokens each image has" in text
    assert "fastv.k=9 must be below the model's 4 decoder layers" in text
    assert "visionzip.layer=5 on " in text and "its vision tower has 2 blocks, so give -2 to 1" in text


def test_run_evaluates_a_suite_and_resumes(tmp_path):
    import tiny_models

    model = tiny_models.testbed_like(tmp_path / "model")
    args = ["run", "--suite", "testbed", "--model", model, "--strategies", "none,fastv", "--budgets", "64",
            "--limit", "2", "--device", "cpu", "--output", str(tmp_path / "results")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "2 cells evaluated, 0 already finished (skipped), 0 failed" in result.output
    assert len(cell_folders(tmp_path / "results")) == 2
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


def modules_loaded_by(*args) -> set[str]:
    """The model libraries a fresh process has imported after running the command line with `args`."""
    code = ("import sys\nfrom pruning_zoo.cli import app\ntry:\n    app(sys.argv[1:], prog_name='pruning-zoo')\n"
            "except SystemExit:\n    pass\n"
            "print(' '.join(m for m in ('torch', 'transformers', 'lmms_eval', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env={
        **os.environ, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split())


def test_help_imports_no_model_library_and_list_no_transformers():
    """What keeps `--help` under a second and `list` under two (scripts/bench_cli_startup.py measures them)."""
    assert modules_loaded_by("--help") == set()
    assert modules_loaded_by("list") == {"torch"}  # the strategies' modules need it; transformers is not loaded


def words(text: str) -> set[str]:
    return set(re.sub(r"[\u2500-\u257f]", " ", text).split())  # box-drawing characters are not words


def test_list_breaks_no_word_on_a_narrow_terminal():
    wide = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    for columns in (80, 60):
        narrow = CliRunner().invoke(app, ["list"], env={"COLUMNS": str(columns)})
        assert narrow.exit_code == 0, narrow.output
        assert max(len(line) for line in narrow.output.splitlines()) <= columns
        # Every word whole, none folded into pieces (a table shown as blocks names its rows without the first header).
        assert words(wide.output) - {"name", "parameter"} <= words(narrow.output)
    assert "Qwen2_5_VLForConditionalGeneration" in narrow.output and "learnpruner.diversity_ratio" in narrow.output


def test_a_model_that_cannot_be_loaded_is_one_message_and_writes_nothing(tmp_path, offline_hub):
    result = CliRunner().invoke(app, ["run", "--suite", "image-vqa", "--model", "some-org/not-downloaded", "--tasks",
                                      "gqa,pope", "--device", "cpu", "--output", str(tmp_path / "results")], env=WIDE)
    assert result.exit_code == 1, result.output  # the options are right; what they name is not here
    text = " ".join(result.output.split())
    # One message, before any cell: every missing model and dataset, and how to use local copies instead.
    assert text.count("error: the sweep cannot start") == 1 and "cells evaluated" not in text
    assert ("not in this machine's cache: model some-org/not-downloaded; dataset lmms-lab-encoder/GQA (task gqa); "
            "dataset lmms-lab-encoder/POPE (task pope). Use local copies: `--data DIR`") in text
    assert not (tmp_path / "results").exists()


def test_ctrl_c_says_what_finished_and_how_to_resume(tmp_path, monkeypatch):
    import tiny_models

    from pruning_zoo.eval.runner import Sweep

    model = tiny_models.testbed_like(tmp_path / "model")
    real_run_cell, calls = Sweep.run_cell, []

    def interrupted_at_the_second_cell(self, cell):
        calls.append(cell)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_cell(self, cell)

    monkeypatch.setattr(Sweep, "run_cell", interrupted_at_the_second_cell)
    args = ["run", "--suite", "testbed", "--model", model, "--strategies", "none,fastv,random", "--budgets", "64",
            "--limit", "2", "--device", "cpu", "--output", str(tmp_path / "results")]
    result = invoke(*args)
    assert result.exit_code == 130
    text = " ".join(result.output.split())
    assert "interrupted: 1 cells evaluated in this run and 0 finished before are stored in" in text
    assert "2 of 3 cells are not done" in text
    assert "The cell in progress (testbed fastv 64) was discarded: nothing of it was written" in text
    assert "Rerun the same command to resume" in text
    assert [folder.name.split("__")[2] for folder in cell_folders(tmp_path / "results")] == ["none"]
    monkeypatch.setattr(Sweep, "run_cell", real_run_cell)
    again = invoke(*args)
    assert again.exit_code == 0 and "2 cells evaluated, 1 already finished (skipped)" in again.output
