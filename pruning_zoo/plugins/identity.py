"""Which code a registered strategy is, recorded beside every result it makes."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
from pathlib import Path

from pruning_zoo.plugins.hookspecs import INTERFACE_VERSION


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
    return {"distribution": source.distribution, "version": source.version, "plugin": source.plugin,
            "interface": INTERFACE_VERSION,
            "module": strategy_class.__module__, "file": path, "source_sha256": digest, "git_sha": commit}
