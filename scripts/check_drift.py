#!/usr/bin/env python3
"""Install pruning-zoo in a fresh virtual environment *without* the lock and run the tests: the drift guard.

    python3 scripts/check_drift.py             # the newest versions pyproject.toml allows (what a new release brings)
    python3 scripts/check_drift.py --lowest    # every direct dependency at its lower bound (are the ranges honest?)
    python3 scripts/check_drift.py --write     # newest, and when the tests pass, make that environment the lock

Each run installs `.[test,eval]` and the example plugin as the README does, runs `pytest -n auto`, writes the
environment it tested to `drift/constraints-MODE.txt` with its test summary, and prints how it differs from
constraints.txt. It exits non-zero when the install or the tests fail, so a scheduled run (`bash .ci/run drift`)
shows the next upstream break before a user meets it. docs/dependencies.md says how to refresh the lock.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
#: What the README installs; the lock covers every package these pull.
INSTALL = ["-e", ".[test,eval]", "-e", "examples/pruning-zoo-example"]
#: Installed by the venv itself or by INSTALL: not part of the lock.
UNLOCKED = re.compile(r"^(pip|pruning-zoo|pruning_zoo|pruning-zoo-example|pruning_zoo_example)\b", re.IGNORECASE)
LOWER_BOUND = re.compile(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(?:[^,]*,)*?\s*>=\s*([0-9][^,;\s]*)")


def lower_bounds() -> list[str]:
    """`name==lower` for every direct dependency of pyproject.toml (core, extras and the build backend)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for extra in project["project"].get("optional-dependencies", {}).values():
        requirements += extra
    pins = []
    for requirement in requirements:
        match = LOWER_BOUND.match(requirement.replace(" ", ""))
        if match is None:
            sys.exit(f"pyproject.toml: {requirement!r} has no lower bound (>=); every direct dependency needs one")
        pins.append(f"{match.group(1)}=={match.group(3)}")
    return pins


def run(command: list[str], log, **options) -> tuple[int, str]:
    """Run a command, its output to the terminal and to the log; returns its exit code and its last summary line
    (pytest's 'N passed, M failed ...')."""
    log.write(f"+ {' '.join(command)}\n")
    log.flush()
    summary = "no test summary"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options)
    for line in process.stdout:
        sys.stdout.write(line)
        log.write(line)
        if re.search(r"\d+ (passed|failed)", line):
            summary = line.strip("= \n")
    return process.wait(), summary


def frozen(python: Path) -> list[str]:
    lines = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return sorted((line for line in lines if line and not line.startswith(("-e", "#")) and not UNLOCKED.match(line)),
                  key=str.lower)


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        name, equals, version = line.partition("==")
        if equals:
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def difference(old: dict[str, str], new: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(old.keys() | new.keys()):
        if old.get(name) != new.get(name):
            rows.append(f"  {name}: {old.get(name, '(absent)')} -> {new.get(name, '(absent)')}")
    return rows


def lock_text(lines: list[str], summary: str) -> str:
    return (
        "# The exact environment the README's commands install: every package, direct and transitive, of\n"
        "# `pip install -e '.[test,eval]' -e examples/pruning-zoo-example`, as resolved and tested (`pytest -n auto`:\n"
        f"# {summary}) on CPython {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{datetime.date.today().isoformat()}.\n"
        "# Use it as a pip constraints file: `pip install -c constraints.txt -e '.[eval]'`. It only fixes versions;\n"
        "# it installs nothing that the requested extras do not need.\n"
        "# Written by `python3 scripts/check_drift.py --write` (docs/dependencies.md); never edit versions by hand.\n"
        + "\n".join(lines) + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lowest", action="store_true", help="direct dependencies at their lower bounds")
    parser.add_argument("--write", action="store_true", help="replace constraints.txt when the tests pass (newest only)")
    parser.add_argument("--venv", type=Path, help="where to build the environment (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "drift", help="folder for the tested environment and log")
    parser.add_argument("pytest_args", nargs="*", default=["-n", "auto"], help="arguments for pytest (after --)")
    args = parser.parse_args()
    if args.write and args.lowest:
        parser.error("--write makes the newest environment the lock; it cannot be combined with --lowest")
    mode = "lowest" if args.lowest else "newest"
    args.out.mkdir(parents=True, exist_ok=True)
    venv = args.venv or Path(tempfile.mkdtemp(prefix=f"pruning-zoo-drift-{mode}-"))
    started = time.monotonic()
    with open(args.out / f"drift-{mode}.log", "w") as log:
        try:
            if run([sys.executable, "-m", "venv", "--clear", str(venv)], log)[0]:
                return 2
            python = venv / "bin" / "python"
            install = [str(python), "-m", "pip", "install", *INSTALL]
            environment = None
            if args.lowest:
                bounds = args.out / "lower-bounds.txt"
                bounds.write_text("\n".join(lower_bounds()) + "\n")
                # PIP_CONSTRAINT (unlike -c) also holds the isolated build of the package: setuptools at its bound.
                environment = {**os.environ, "PIP_CONSTRAINT": str(bounds)}
            if run(install, log, cwd=ROOT, env=environment)[0]:
                print(f"\n{mode}: the install failed; see {args.out / f'drift-{mode}.log'}", file=sys.stderr)
                return 1
            installed = frozen(python)
            tested = args.out / f"constraints-{mode}.txt"
            tested.write_text("\n".join(installed) + "\n")
            print("\nchanged against constraints.txt:")
            print("\n".join(difference(pins(LOCK.read_text().splitlines()), pins(installed))) or "  nothing")
            code, summary = run([str(python), "-m", "pytest", *args.pytest_args], log, cwd=ROOT)
            minutes = (time.monotonic() - started) / 60
            print(f"\n{mode}: tests exited {code} ({summary}) after {minutes:.1f} min; environment in {tested}")
            if code:
                return 1
            if args.write:
                LOCK.write_text(lock_text(installed, summary))
                print(f"wrote {LOCK}: review its diff and commit it with the test summary")
            return 0
        finally:
            if args.venv is None:
                shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
