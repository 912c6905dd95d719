"""Where a result came from: the code's git SHA, package versions and the device, recorded beside it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

#: Packages whose versions change what a result measures.
RECORDED_PACKAGES = ("pruning-zoo", "torch", "transformers", "lmms-eval", "accelerate")


def git_sha() -> str:
    """The commit of the code that ran. PRUNING_ZOO_GIT_SHA overrides it (for copies without a current .git);
    read from this package's own checkout, not the working directory."""
    if os.environ.get("PRUNING_ZOO_GIT_SHA"):
        return os.environ["PRUNING_ZOO_GIT_SHA"]
    checkout = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def versions() -> dict[str, str]:
    """Python and the recorded packages that are installed."""
    found = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def device_description(device: torch.device | str) -> str:
    """A GPU's name, or the CPU's with the threads torch uses: results on different devices are never mixed."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"
