"""Where a result came from: the code's git SHA, package versions and the device, recorded beside it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
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


def code_identity(strategy_class: type, source) -> dict:
    """Which code a strategy is: the distribution (and version) that registered it, its module, a hash of the
    module's source, and the git commit of the checkout it lies in (an editable or local install). A result records
    it, and its cell's identity includes the hash: a changed strategy makes new cells, never reuses old ones."""
    try:
        path = inspect.getsourcefile(strategy_class)
    except (TypeError, OSError):  # a class defined in no file (built at run time)
        path = None
    digest, commit = None, None
    if path and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        try:
            commit = subprocess.run(["git", "-C", str(Path(path).parent), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip() or None
        except (OSError, subprocess.CalledProcessError):
            commit = None
    from pruning_zoo import INTERFACE_VERSION

    return {"distribution": source.distribution, "version": source.version, "plugin": source.plugin,
            "interface": INTERFACE_VERSION,
            "module": strategy_class.__module__, "file": path, "source_sha256": digest, "git_sha": commit}


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
