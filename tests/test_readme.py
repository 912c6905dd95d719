"""The README's claims that code can check: its Python example runs, its strategy table matches `pruning-zoo
list`, and its two set-up commands install from the lock."""

import re
import subprocess
import sys
from pathlib import Path

import pruning_zoo
from pruning_zoo import plugins
from pruning_zoo.cli.run import REFERENCE_BUDGET, REFERENCE_LAYERS, REFERENCE_TOKENS
from pruning_zoo.strategy import describe_stages, plan_stages

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_the_python_example_runs_on_the_testbed_model(tmp_path):
    code = re.search(r"<!-- python-example -->\n```python\n(.*?)```", README, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer, record = done.stdout.splitlines()[-2:]
    assert answer.strip() == "diamond"
    entering, average, kept = record.split()
    assert int(entering) == 576 and int(kept) == 64 and 64 < float(average) < 576


def test_the_strategy_table_shows_what_list_shows():
    rows = re.findall(r"^\| `([a-z_-]+)` \| ([^|]+) \|", README, re.M)
    builtin = {entry.name for entry in plugins.strategies() if entry.source.distribution == "pruning-zoo"}
    assert {name for name, _ in rows} == builtin, "every built-in strategy has its row"
    for name, where in rows:
        stages = plan_stages(pruning_zoo.get_strategy(name), REFERENCE_BUDGET, REFERENCE_TOKENS, REFERENCE_LAYERS)
        assert where.strip() == (describe_stages(stages) or "(keeps every token)"), name


def test_both_setup_commands_install_from_the_lock():
    commands = re.findall(r"^python3 -m venv .*$", README, re.M)
    assert len(commands) == 2 and all("pip install -c constraints.txt " in command for command in commands)
    assert (Path(__file__).parent.parent / "constraints.txt").is_file()
