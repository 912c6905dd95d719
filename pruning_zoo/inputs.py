"""The validation layer every command shares: devices, dtypes, numbers, names, files read and folders written.

Each check returns the value it validated or raises an InvalidParameterError that names the option, the bad
value and what to give instead; commands call these before any work starts (never after an hour of evaluation).
Folders and files are checked without being created, so a dry run leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pruning_zoo.errors import InvalidParameterError, PruningZooError

#: Longer names are not names (a pasted file, a runaway shell variable): refused before any lookup.
MAX_NAME_LENGTH = 200
#: Suite, task and record files are small text; a larger one is the wrong file.
MAX_TEXT_BYTES = 64 * 1024 * 1024
#: Nesting deeper than this in a YAML file is not a suite (and would exhaust the parser's recursion).
MAX_YAML_DEPTH = 64
#: Values a YAML file may expand to, its aliases expanded (a "billion laughs" file expands to billions).
MAX_YAML_VALUES = 1_000_000
DEVICE_FORM = re.compile(r"cpu|cuda(:\d{1,3})?")


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: repr, shortened in the middle if long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2:]} ({len(str(value))} characters)"


def device(text: str | None, option: str = "--device", gpu_only: bool = False) -> str:
    """'cpu', 'cuda' or 'cuda:N' that exists here; None gives cuda when there is one, else cpu."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text is None:
        text = "cuda" if count else "cpu"
    text = text.strip()
    if not DEVICE_FORM.fullmatch(text):
        raise InvalidParameterError(f"{option} {shown(text)} is not a device; give cpu, cuda or cuda:N")
    if gpu_only and text == "cpu":
        raise InvalidParameterError(f"{option} cpu: this command times CUDA kernels and needs a GPU; run it on a "
                                    "GPU (--device cuda)")
    if text.startswith("cuda"):
        if count == 0:
            hint = "run it on a GPU" if gpu_only else "pass --device cpu (slower) or run on a machine with a GPU"
            raise InvalidParameterError(f"{option} {text}: no CUDA device is visible here; {hint}")
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            raise InvalidParameterError(f"{option} {text}: this machine has {count} CUDA device(s), cuda:0 to "
                                        f"cuda:{count - 1}")
    return text


def dtype(text: str, allowed: tuple[str, ...], option: str = "--dtype") -> str:
    if text not in allowed:
        raise InvalidParameterError(f"{option} {shown(text)} is not one of {', '.join(allowed)}")
    return text


def whole_number(text: str, option: str, low: int = 1, high: int = 10**9) -> int:
    """Digits only (no sign, no '_', no exponent) between `low` and `high`."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise InvalidParameterError(f"{option}: {shown(text)} is not a whole number from {low} to {high:,}")
    return int(text)


def name_list(text: str | None, option: str) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None stays None (the default applies); an empty list is an error."""
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InvalidParameterError(f"{option} {shown(text)} names nothing; give comma-separated names, e.g. "
                                    f"{option} none,fastv")
    for name in names:
        check_name(name, option)
    return names


def check_name(name: str, what: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidParameterError(f"{what} {shown(name)} is not a name: give at most {MAX_NAME_LENGTH} printable "
                                    "characters")
    return name


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    return current


def output_folder(path: Path, option: str) -> Path:
    """A folder that is or can be made here and written into; nothing is created."""
    try:
        if path.exists() and not path.is_dir():
            raise InvalidParameterError(f"{option} {path} exists and is not a folder; choose a folder path")
        ancestor = _nearest_existing(path)
        if not ancestor.is_dir():
            raise InvalidParameterError(f"{option} {path} cannot be made: {ancestor} is a file, not a folder; choose "
                                        "a folder path")
        # A probe file, not os.access: root passes os.access everywhere, /proc refuses files anyway.
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".pruning-zoo-probe-"):
            pass
    except OSError as error:
        raise InvalidParameterError(f"{option} {path} cannot be written ({error.strerror or error}); choose a folder "
                                    "you can write to") from None
    return path


def training_folder(path: Path, resume: bool, state: str, what: str, option: str = "--out") -> Path:
    """The folder a training run writes: new or empty, or, with `resume`, one holding the `state` file an
    interrupted run left there. A finished model is never overwritten."""
    if resume and not (path / state).is_file():
        raise PruningZooError(f"--resume but {path / state} does not exist; start without --resume")
    if not resume and path.exists() and any(path.iterdir()):
        raise PruningZooError(f"{option} {path} is not empty; choose a new folder so no {what} is overwritten "
                              "(or --resume an interrupted run there)")
    return path


def output_file(path: Path, option: str) -> Path:
    """A file path whose folder can be written; an existing folder is not a file."""
    if path.is_dir():
        raise InvalidParameterError(f"{option} {path} is a folder; give a file path (e.g. {path / 'results.json'})")
    output_folder(path.parent, option)
    return path


def input_folder(path: Path, option: str, what: str = "a folder") -> Path:
    try:
        if not path.is_dir():
            raise InvalidParameterError(f"{option} {path} is not {what}" + (" (it does not exist)" if not path.exists()
                                                                           else ""))
    except OSError as error:
        raise InvalidParameterError(f"{option} {shown(str(path))} cannot be read: {error.strerror or error}") from None
    return path


def read_text(path: Path, what: str) -> str:
    """A regular file of UTF-8 text (a folder, FIFO, device, binary or other encoding is refused, never read)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, socket or device)"
            raise InvalidParameterError(f"{what} {path} is {kind}; give a text file")
        if info.st_size > MAX_TEXT_BYTES:
            raise InvalidParameterError(f"{what} {path} is {info.st_size:,} bytes, more than any such text file "
                                        f"({MAX_TEXT_BYTES:,}); check the path")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidParameterError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise InvalidParameterError(f"{what} {shown(str(path))} cannot be read: {error.strerror or error}") from None
    if b"\0" in data:
        raise InvalidParameterError(f"{what} {path} is binary, not text; give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidParameterError(f"{what} {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it "
                                    "as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML in which a key given twice in one mapping is an error (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _shape(node) -> tuple[int, int]:
    """(nesting depth, size with every alias expanded) of a YAML node graph, each node visited once: aliases share
    nodes, so a walk of the expanded tree would take exponential time on a 'billion laughs' file."""
    shapes: dict[int, tuple[int, int]] = {}
    stack = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        if id(current) in shapes:
            continue
        children = ([] if isinstance(current, yaml.ScalarNode) else current.value if isinstance(current, yaml.SequenceNode)
                    else [child for pair in current.value for child in pair])
        if children_done:
            below = [shapes[id(child)] for child in children]
            shapes[id(current)] = (1 + max((d for d, _ in below), default=0), 1 + sum(n for _, n in below))
        else:
            stack.append((current, True))
            stack.extend((child, False) for child in children if id(child) not in shapes)
    return shapes[id(node)]


def parse_yaml(text: str, origin: str) -> Any:
    """Safe YAML with unique keys and bounded nesting; every parse error becomes one message naming `origin`."""
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            depth, size = _shape(node) if node is not None else (0, 0)
            if depth > MAX_YAML_DEPTH:
                raise InvalidParameterError(f"{origin} nests deeper than {MAX_YAML_DEPTH} levels; it is not a suite "
                                            "or task file")
            if size > MAX_YAML_VALUES:
                raise InvalidParameterError(f"{origin} expands to {size:,} values (its aliases repeat others), more "
                                            f"than any suite ({MAX_YAML_VALUES:,}); write the values out")
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise InvalidParameterError(f"{origin} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise InvalidParameterError(f"{origin} nests too deeply to read; it is not a suite or task file") from None


def yaml_mapping(path: Path, what: str) -> dict:
    data = parse_yaml(read_text(path, what), f"{what} {path}")
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{what} {path} must hold a mapping of fields, not {type(data).__name__}")
    return data
