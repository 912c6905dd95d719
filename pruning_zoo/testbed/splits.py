"""The testbed's fixed validation and test splits: PNG images plus one JSON line per question (its answer,
family and evidence patches), written once and read back as files, so every run sees the same data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pruning_zoo.testbed.questions import Question, questions_for
from pruning_zoo.testbed.scenes import generate_scene, render
from pruning_zoo.testbed.train import TEST_SEEDS, VALIDATION_SEEDS

#: split name -> (first scene seed, scenes)
SPLITS = {"validation": (VALIDATION_SEEDS, 80), "test": (TEST_SEEDS, 250)}


def write_split(folder: Path, name: str) -> Path:
    """Write `name`'s images under folder/images and its questions to folder/{name}.jsonl."""
    first, count = SPLITS[name]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    temporary = path.with_suffix(".jsonl.tmp")
    with temporary.open("w") as lines:
        for seed in range(first, first + count):
            scene = generate_scene(seed)
            image_name = f"images/{seed}.png"
            render(scene)[0].save(folder / image_name, format="PNG", optimize=True)
            for number, question in enumerate(questions_for(scene)):
                record = {"id": f"{seed}-{number}", "image": image_name, **dataclasses.asdict(question)}
                record["evidence"] = list(question.evidence)
                lines.write(json.dumps(record) + "\n")
    temporary.replace(path)  # a split appears whole or not at all
    return path


def read_split(folder: Path, name: str) -> list[dict]:
    """The records of split `name` (one of SPLITS) in `folder`."""
    if name not in SPLITS:
        from pruning_zoo.errors import PruningZooError

        raise PruningZooError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {name} split at {path}; write it with `pruning-zoo testbed splits --out {folder}`")
    from pruning_zoo.errors import PruningZooError
    from pruning_zoo.inputs import read_text

    try:
        return [json.loads(line) for line in read_text(path, f"the {name} split").splitlines() if line.strip()]
    except ValueError as error:
        raise PruningZooError(f"the {name} split {path} is not JSON lines ({error}); write it again with "
                              f"`pruning-zoo testbed splits --out {folder}`") from None


def as_question(record: dict) -> Question:
    fields = {f.name for f in dataclasses.fields(Question)}
    values = {k: v for k, v in record.items() if k in fields}
    values["evidence"] = tuple(values["evidence"])
    return Question(**values)
