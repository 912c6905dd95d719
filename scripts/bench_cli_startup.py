#!/usr/bin/env python3
"""Wall-clock of `pruning-zoo --help` and `pruning-zoo list` (what a newcomer types first), each in a fresh process.

    python3 scripts/bench_cli_startup.py --repeats 10 --out leaderboard/checks/cli-startup.json

Runs the installed console script `repeats` times after one warm-up run (which compiles the .pyc files) and
records the median and the range, with the command, git SHA, versions and CPU. Targets: --help under 1 s, list
under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pruning_zoo.provenance import git_sha, versions  # noqa: E402

COMMANDS = {"--help": ["--help"], "list": ["list"]}
TARGETS_S = {"--help": 1.0, "list": 2.0}


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = parser.parse_args()
    script = shutil.which("pruning-zoo")
    if script is None:
        sys.exit("pruning-zoo is not on PATH: activate the environment it is installed in")
    report = {"command": " ".join(["python3", *sys.argv]), "git_sha": git_sha(), "versions": versions(), "cpu": cpu(),
              "how": f"wall-clock of the console script in a fresh process, median of {args.repeats} after 1 warm-up",
              "results": {}}
    for name, arguments in COMMANDS.items():
        seconds = []
        for attempt in range(args.repeats + 1):
            started = time.perf_counter()
            subprocess.run([script, *arguments], check=True, capture_output=True, env={**os.environ, "COLUMNS": "120"})
            if attempt:  # the first run writes the bytecode caches
                seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        report["results"][name] = {"median_s": round(median, 3), "min_s": round(min(seconds), 3),
                                   "max_s": round(max(seconds), 3), "target_s": TARGETS_S[name],
                                   "meets_target": median < TARGETS_S[name]}
        print(f"pruning-zoo {name}: median {median:.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f}); "
              f"target < {TARGETS_S[name]} s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
