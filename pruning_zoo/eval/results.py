"""Stored results: one folder per cell (model x task x strategy x budget), written atomically.

A cell folder holds `config.json` (what ran, with provenance) and either `metrics.json` plus `samples.jsonl.gz`
(finished) or `error.json` (failed). It is written under a temporary name and renamed into place, so a folder
with the cell's name is always complete; an interrupted run leaves only temporaries, removed on the next run.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import pydantic

from pruning_zoo.errors import OutputBusyError, PruningZooError
from pruning_zoo.strategy.budget import Budget

#: Per-document records are gzipped JSON lines: a full testbed cell is 420 kB as text, 60 kB compressed.
CONFIG, METRICS, SAMPLES, ERROR = "config.json", "metrics.json", "samples.jsonl.gz", "error.json"
TEMPORARY_PREFIX = ".partial-"
#: The suffix of a damaged cell folder set aside (renamed, never deleted) so that its cell is evaluated again.
SET_ASIDE_SUFFIX = ".corrupt"
#: The version of metrics.json's layout, written into every one (results before it have none: version 1 too).
SCHEMA_VERSION = 1
#: The output folder's lock (held by the one process writing it) and who holds it (read to say so).
LOCK_FILE, RUNNING_FILE = ".pruning-zoo.lock", ".pruning-zoo.running.json"

Number = float | int | None


class _Stored(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow", strict=True)


class StoredLatency(_Stored):
    time_to_first_token_ms: Number
    selection_ms: Number
    decode_ms_per_token: Number
    peak_memory_bytes: int | None
    device: str
    clock: str
    mode: str
    batch_size: int


class StoredMetrics(_Stored):
    """What a finished cell's metrics.json must hold for a resume to trust it and the leaderboard to read it."""

    schema_: int = pydantic.Field(default=SCHEMA_VERSION, alias="schema", le=SCHEMA_VERSION)
    documents: int
    primary_metric: str | None
    scores: dict[str, Number]
    visual_tokens: dict[str, Number | str]
    flops: dict[str, Number | str]
    evidence_recall: Number
    latency: StoredLatency


class StoredCell(_Stored):
    model: str
    task: str
    strategy: str
    params: dict
    budget: Number
    limit: int | None


class StoredConfig(_Stored):
    cell: StoredCell
    git_sha: str
    versions: dict[str, str]
    command: str
    started: str


def read_finished(folder: Path) -> tuple[dict, dict] | str:
    """A finished cell folder's (config, metrics), each read once and validated; or what is wrong with them."""
    read = []
    for name, model in ((CONFIG, StoredConfig), (METRICS, StoredMetrics)):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            return f"{name} cannot be read as JSON ({type(error).__name__}: {str(error)[:120]})"
        try:
            model.model_validate(data)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            return f"{name} is not a result's: {where}: {first['msg']} ({error.error_count()} problem(s))"
        read.append(data)
    return read[0], read[1]


def damage(folder: Path) -> str | None:
    """What is wrong with a finished cell folder's config.json or metrics.json, or None when both are sound."""
    found = read_finished(folder)
    return found if isinstance(found, str) else None


def set_aside(folder: Path) -> Path:
    """Rename a damaged cell folder to FOLDER.corrupt (FOLDER.corrupt-2, ... if taken); returns the new path."""
    target, number = folder.with_name(folder.name + SET_ASIDE_SUFFIX), 1
    while target.exists():
        number += 1
        target = folder.with_name(f"{folder.name}{SET_ASIDE_SUFFIX}-{number}")
    os.rename(folder, target)
    return target


def is_set_aside(folder: Path) -> bool:
    return SET_ASIDE_SUFFIX in folder.name


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
    #: A hash of the strategy's source (plugins.identity.code_identity): other code is another cell.
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


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk: after a crash a renamed folder then holds whole files."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def durable_write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (temporary file, fsync, rename), for files outside cell folders."""
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        durable_write_text(temporary, text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def output_lock(output: Path, command: str):
    """An exclusive lock on `output` for this process (released when it exits, however it exits); another
    process holding it is an error that says which."""
    import filelock

    lock = filelock.FileLock(output / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = json.loads((output / RUNNING_FILE).read_text(encoding="utf-8"))
            who = f" (process {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = ""
        raise OutputBusyError(f"another pruning-zoo run is writing to {output}{who}; wait for it to finish, or give "
                              "this run another --output") from None
    atomic_write_text(output / RUNNING_FILE, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}) + "\n")
    return lock


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
        durable_write_text(temporary / CONFIG, json.dumps(clean_json(config), indent=1) + "\n")
        if error is not None:
            durable_write_text(temporary / ERROR, json.dumps(clean_json(error), indent=1) + "\n")
        else:
            # mtime=0: the same samples give the same bytes.
            with open(temporary / SAMPLES, "wb") as target:
                with gzip.GzipFile(fileobj=target, mode="wb", mtime=0) as raw, \
                        io.TextIOWrapper(raw, encoding="utf-8") as file:
                    for sample in samples or []:
                        file.write(json.dumps(clean_json(sample), default=str) + "\n")
                target.flush()
                os.fsync(target.fileno())
            if files is not None and files.is_dir():
                shutil.move(files, temporary / files.name)
            durable_write_text(temporary / METRICS,
                               json.dumps(clean_json({"schema": SCHEMA_VERSION, **metrics}), indent=1) + "\n")
        fsync_path(temporary)
        if final.exists():
            if status(final) == "finished":
                raise PruningZooError(f"{final} already holds a finished result; it is never overwritten")
            shutil.rmtree(final)
        os.rename(temporary, final)
        fsync_path(output)
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
        if folder.name.startswith(TEMPORARY_PREFIX) or is_set_aside(folder) or status(folder) != "finished":
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
    removed = list(output.glob(f"{TEMPORARY_PREFIX}*"))
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def finished_cells(paths: list[Path], damaged: list[tuple[Path, str]] | None = None) -> list[dict]:
    """The config and metrics of every sound finished cell under `paths` (folders searched recursively), sorted
    by folder name so that the order never depends on the file system. Damaged ones are left out and, with
    `damaged`, listed there as (folder, what is wrong); set-aside folders are skipped."""
    found = []
    for path in paths:
        if not path.is_dir():
            raise PruningZooError(f"results folder {path} does not exist; pass folders written by `pruning-zoo run --output`")
        for metrics_file in sorted(path.rglob(METRICS)):
            folder = metrics_file.parent
            if folder.name.startswith(TEMPORARY_PREFIX) or is_set_aside(folder):
                continue
            read = read_finished(folder)
            if isinstance(read, str):
                if damaged is not None:
                    damaged.append((folder, read))
                continue
            config, metrics = read
            found.append({"folder": folder, "config": config, "metrics": metrics})
    return sorted(found, key=lambda item: (item["folder"].name, str(item["folder"])))
