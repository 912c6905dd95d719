"""Stored results: one folder per cell (model x task x strategy x budget), written atomically.

A cell folder holds `config.json` (what ran, with provenance) and either `metrics.json` plus `samples.jsonl.gz`
(finished) or `error.json` (failed). It is written under a temporary name and renamed into place, so a folder
with the cell's name is always complete; an interrupted run leaves only temporaries, removed on the next run.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from pruning_zoo.budget import Budget
from pruning_zoo.errors import PruningZooError

#: Per-document records are gzipped JSON lines: a full testbed cell is 420 kB as text, 60 kB compressed.
CONFIG, METRICS, SAMPLES, ERROR = "config.json", "metrics.json", "samples.jsonl.gz", "error.json"
TEMPORARY_PREFIX = ".partial-"


@dataclasses.dataclass(frozen=True)
class Cell:
    """What one cell evaluates; its folder name is derived from all of it, so a changed setting is a new cell."""

    model: str
    task: str
    strategy: str
    #: The strategy's parameters as given (overrides of its defaults).
    params: dict[str, Any]
    #: Visual tokens per image, a ratio of them, or 1.0 (all) for the unpruned model.
    budget: Budget
    limit: int | None
    batch_size: int
    dtype: str
    device_type: str
    #: A hash of the strategy's source (provenance.code_identity): other code is another cell.
    strategy_code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def budget_label(self) -> str:
        return "all" if self.strategy == "none" else str(self.budget)

    @property
    def folder_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.strip("/")).strip("-.")[-60:]
        return f"{model}__{self.task}__{self.strategy}__{self.budget_label}__{digest}"


def status(folder: Path) -> str:
    """'finished', 'failed' or 'missing'."""
    if (folder / METRICS).is_file():
        return "finished"
    if (folder / ERROR).is_file():
        return "failed"
    return "missing"


def clean_json(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def write_cell(output: Path, cell: Cell, config: dict, metrics: dict | None = None, samples: list[dict] | None = None,
               error: dict | None = None, files: Path | None = None) -> Path:
    """Write a finished (metrics and samples) or failed (error) cell atomically; returns its folder. A failed
    record of the same cell is replaced. `files`, a folder, is moved into a finished cell under its own name."""
    if (metrics is None) == (error is None):
        raise ValueError("a cell is written with metrics or with an error")
    final = output / cell.folder_name
    # A plain mkdir (not tempfile.mkdtemp, which makes 0700 folders): the folder gets the user's umask, so results
    # are as readable as any file the user writes.
    temporary = output / f"{TEMPORARY_PREFIX}{cell.folder_name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        (temporary / CONFIG).write_text(json.dumps(clean_json(config), indent=1) + "\n")
        if error is not None:
            (temporary / ERROR).write_text(json.dumps(clean_json(error), indent=1) + "\n")
        else:
            # mtime=0: the same samples give the same bytes.
            with gzip.GzipFile(temporary / SAMPLES, "wb", mtime=0) as raw, io.TextIOWrapper(raw, encoding="utf-8") as file:
                for sample in samples or []:
                    file.write(json.dumps(clean_json(sample), default=str) + "\n")
            if files is not None and files.is_dir():
                shutil.move(files, temporary / files.name)
            (temporary / METRICS).write_text(json.dumps(clean_json(metrics), indent=1) + "\n")
        if final.exists():
            if status(final) == "finished":
                raise PruningZooError(f"{final} already holds a finished result; it is never overwritten")
            shutil.rmtree(final)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def read_samples(folder: Path) -> list[dict]:
    """The per-document records of a finished cell."""
    with gzip.open(folder / SAMPLES, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def superseded_cells(output: Path, cells: list[Cell]) -> list[Path]:
    """Finished folders in `output` that hold one of `cells` as made by other code of its strategy: the sweep
    evaluates those cells again (their new folders have other names) and leaves the old folders as they are."""
    wanted = {json.dumps({**cell.as_dict(), "strategy_code": None}, sort_keys=True, default=str): cell for cell in cells}
    found = []
    for config_file in sorted(output.glob(f"*/{CONFIG}")):
        folder = config_file.parent
        if folder.name.startswith(TEMPORARY_PREFIX) or status(folder) != "finished":
            continue
        try:
            stored = json.loads(config_file.read_text())["cell"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        cell = wanted.get(json.dumps({**stored, "strategy_code": None}, sort_keys=True, default=str))
        if cell is not None and stored.get("strategy_code") != cell.strategy_code:
            found.append(folder)
    return found


def remove_temporaries(output: Path) -> list[Path]:
    """Delete what interrupted runs left half-written; returns what was removed."""
    removed = [path for path in output.glob(f"{TEMPORARY_PREFIX}*") if path.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def finished_cells(paths: list[Path]) -> list[dict]:
    """The config and metrics of every finished cell under `paths` (folders searched recursively), sorted
    by folder name so that the order never depends on the file system."""
    found = []
    for path in paths:
        if not path.is_dir():
            raise PruningZooError(f"results folder {path} does not exist; pass folders written by `pruning-zoo run --output`")
        for metrics_file in path.rglob(METRICS):
            folder = metrics_file.parent
            if folder.name.startswith(TEMPORARY_PREFIX):
                continue
            try:
                config = json.loads((folder / CONFIG).read_text())
                metrics = json.loads(metrics_file.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise PruningZooError(f"result folder {folder} is unreadable ({error}); delete it and rerun its cell") from None
            found.append({"folder": folder, "config": config, "metrics": metrics})
    return sorted(found, key=lambda item: (item["folder"].name, str(item["folder"])))
