"""Where a sweep's data and models come from, checked before any cell runs.

A task's dataset is the hub repository its lmms-eval YAML names (`dataset_path: lmms-lab-encoder/GQA`), or a local
copy of it: with a data folder (`--data DIR`, `data:` in a suite), `DIR/OWNER/NAME` laid out as the repository is
(what `hf download OWNER/NAME --repo-type dataset --local-dir DIR/OWNER/NAME` makes). The task then runs with DIR
as its working directory, where `datasets.load_dataset("OWNER/NAME", ...)` finds the folder before the hub: the
task's YAML and code run unchanged, including datasets its own code loads by hub id (GQA's images).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import socket
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

#: Tasks whose aggregation asks an OpenAI-compatible API to read answers its rules cannot: without a key it retries
#: for about 45 s per such answer and then guesses a letter at random. -> the same task with rule-based reading.
JUDGED_TASKS = {"mmbench_en_dev": "mmbench_en_dev_static", "mmbench_cn_dev": None, "mmbench_en_test": None,
                "mmbench_cn_test": None, "mmbench_cn_cc": None, "mmbench_ru_dev": None}


#: The functions of a task YAML that decide what a document says and how it scores.
HOOKS = ("process_docs", "doc_to_visual", "doc_to_text", "doc_to_target", "process_results")


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Where one task's documents come from."""

    task: str
    yaml_path: str | None
    dataset_path: str | None
    dataset_name: str | None
    split: str | None
    #: The local copy of the task's hub dataset, when a data folder is in use and the dataset is a hub id.
    local: Path | None = None
    #: The task's own functions (process_results, doc_to_text, ...) as `FILE:NAME`: which code scores it.
    hooks: tuple[tuple[str, str], ...] = ()

    @property
    def hub_dataset(self) -> bool:
        """The dataset is a hub repository id (OWNER/NAME), not a builder over files (json, parquet) or a path."""
        path = self.dataset_path or ""
        return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()

    def describe(self) -> str:
        parts = [f"task {self.task!r} reads {self.dataset_path}"]
        details = [f"config {self.dataset_name}"] * bool(self.dataset_name) + [f"split {self.split}"] * bool(self.split)
        return parts[0] + (f" ({', '.join(details)})" if details else "")


def task_data(task_manager, task: str, data_folder: Path | None) -> TaskData:
    """The dataset a task's YAML (with its includes) names, and its local copy under `data_folder`."""
    from lmms_eval import utils

    yaml_path = task_manager.task_index[task].get("yaml_path")
    config = utils.load_yaml_config(yaml_path, mode="full") if isinstance(yaml_path, str) else {}
    hooks = tuple((name, f"{inspect.getsourcefile(config[name])}:{config[name].__name__}") for name in HOOKS
                  if callable(config.get(name)))
    data = TaskData(task, yaml_path if isinstance(yaml_path, str) else None, config.get("dataset_path"),
                    config.get("dataset_name"), config.get("test_split") or config.get("validation_split"), hooks=hooks)
    if data_folder is not None and data.hub_dataset:
        data = dataclasses.replace(data, local=data_folder / data.dataset_path)
    return data


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used from here, or None when it can. One connection attempt of at most
    3 s: the libraries' own lookups retry for about 25 s per file before they give up."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached: {error}"
    return None


def local_copy_problem(data: TaskData) -> str | None:
    """What is wrong with a task's local copy, or None when the config and split it needs are there."""
    import datasets

    folder = data.local
    download = f"`hf download {data.dataset_path} --repo-type dataset --local-dir {folder}`"
    if not folder.is_dir():
        return f"{data.describe()}: there is no folder {folder}; on a machine with network run {download}"
    try:
        builder = datasets.load_dataset_builder(str(folder), data.dataset_name)
    except Exception as error:  # noqa: BLE001 - any failure to read the copy is reported with the others
        return f"{data.describe()}: the copy in {folder} cannot be read ({type(error).__name__}: {error})"
    splits = sorted(builder.config.data_files or {})
    if data.split and data.split not in splits:
        return (f"{data.describe()}: the copy in {folder} has no split {data.split!r} (it has {', '.join(splits) or 'none'}); "
                f"download the whole repository with {download}")
    return None


def cached_offline(data: TaskData) -> bool:
    """The dataset was prepared in this machine's datasets cache (what `load_dataset` falls back to offline)."""
    from datasets import load

    try:  # datasets' own offline fallback; not a public API, so any other failure does not block the run
        load.CachedDatasetModuleFactory(data.dataset_path).get_module()
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


def model_cached(model: str) -> bool:
    import huggingface_hub

    try:
        return isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a hub id at all (huggingface_hub's HFValidationError)
        return False


def source_problems(tasks: list[TaskData], models: list[str], data_folder: Path | None) -> list[str]:
    """What keeps a sweep's models and task datasets from being had here, one line each."""
    problems = []
    if data_folder is not None:
        if not data_folder.is_dir():
            return [f"the data folder {data_folder} does not exist; give a folder of local dataset copies "
                    "laid out as OWNER/NAME (see docs/real-datasets.md)"]
        problems += [p for p in (local_copy_problem(t) for t in tasks if t.local is not None) if p]
    for data in tasks:
        if data.task in JUDGED_TASKS and not os.environ.get("OPENAI_API_KEY"):
            static = JUDGED_TASKS[data.task]
            problems.append(
                f"task {data.task!r} asks an OpenAI-compatible API (OPENAI_API_KEY, OPENAI_API_URL) to read the answers its "
                "rules cannot; without a key it retries for about 45 s per such answer and then guesses at random. Set "
                "OPENAI_API_KEY" + (f", or run {static!r}: the same data, prompts and circular evaluation, answers read "
                                    "by rules alone" if static else ""))
    remote_tasks = [t for t in tasks if t.hub_dataset and t.local is None]
    remote_models = [m for m in models if not Path(m).is_dir()]
    if remote_tasks or remote_models:
        reason = hub_unreachable()
        if reason is not None:
            missing = [f"model {m}" for m in remote_models if not model_cached(m)]
            missing += [f"dataset {t.dataset_path} (task {t.task})" for t in remote_tasks if not cached_offline(t)]
            if missing:
                problems.append(
                    f"the Hugging Face hub cannot be used ({reason}) and these are not in this machine's cache: "
                    f"{'; '.join(missing)}. Use local copies: `--data DIR` with each dataset downloaded on a connected "
                    "machine into DIR/OWNER/NAME (`hf download OWNER/NAME --repo-type dataset --local-dir DIR/OWNER/NAME`) "
                    "and `--model FOLDER` for a downloaded model; or copy the Hugging Face cache (HF_HOME) of a machine "
                    "that ran the suite and set HF_HUB_OFFLINE=1. `pruning-zoo run --suite image-vqa-local` runs the "
                    "same tasks offline on local copies (docs/real-datasets.md)")
            elif not reason.startswith("HF_HUB_OFFLINE"):
                log.warning("the hub cannot be reached (%s); set HF_HUB_OFFLINE=1 so that cached files are used "
                            "without retrying the hub for each", reason)
    return problems
