"""What LearnPruner trains on: image/question/answer examples, from fresh testbed scenes or a file of records.

Each source gives step s its batch as a pure function of (seed, step), so a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

from PIL import Image

from pruning_zoo.errors import PruningZooError
from pruning_zoo.inputs import read_text


@dataclasses.dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str


class SceneExamples:
    """Endless questions on fresh testbed scenes (seeds apart from the splits' and the reference model's)."""

    FIRST_SEED = 50_000_000

    def __init__(self, seed: int):
        self.seed = seed

    def batch(self, step: int, size: int) -> list[Example]:
        from pruning_zoo.testbed.questions import questions_for
        from pruning_zoo.testbed.scenes import generate_scene, render

        rng = random.Random(f"learnpruner-{self.seed}-{step}")
        examples = []
        scene_index = step * size
        while len(examples) < size:
            scene = generate_scene(self.FIRST_SEED + self.seed * 10_000_000 + scene_index)
            scene_index += 1
            image, _ = render(scene)
            for question in questions_for(scene, seed=rng.randrange(1 << 30)):
                if len(examples) < size:
                    examples.append(Example(image, question.question, question.answer))
        return examples


class FileExamples:
    """Image/question/answer records from a JSON or JSON-lines file: LLaVA's instruction format (`image` and
    `conversations` with a human turn then a gpt turn; the first pair is used) or flat records (`image`,
    `question`, `answer`). Images are relative to `image_folder` (default: the file's folder)."""

    def __init__(self, path: Path, image_folder: Path | None, seed: int):
        if not os.path.lexists(path):
            raise PruningZooError(f"--data {path} does not exist; give 'testbed' or a JSON / JSON-lines file of records")
        text = read_text(path, "--data")
        try:
            records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, RecursionError) as error:
            raise PruningZooError(f"--data {path} is not JSON or JSON lines: {error}") from None
        self.folder = image_folder or path.parent
        self.records = [self._parse(record, number, path) for number, record in enumerate(records, 1)]
        if not self.records:
            raise PruningZooError(f"--data {path} holds no records")
        self.seed = seed

    def _parse(self, record: dict, number: int, path: Path) -> tuple[str, str, str]:
        if not isinstance(record, dict) or "image" not in record:
            raise PruningZooError(f"{path}, record {number}: expected an object with an 'image' field")
        if "conversations" in record:
            turns = record["conversations"]
            human = next((t["value"] for t in turns if t.get("from") == "human"), None)
            answer = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
            question = None if human is None else human.replace("<image>", "").strip()
        else:
            question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise PruningZooError(
                f"{path}, record {number}: needs 'question' and 'answer' strings, or LLaVA 'conversations' with a "
                "human and a gpt turn"
            )
        return record["image"], question, answer

    def example(self, index: int) -> Example:
        image, question, answer = self.records[index]
        path = self.folder / image
        try:
            return Example(Image.open(path).convert("RGB"), question, answer)
        except OSError as error:
            raise PruningZooError(f"cannot read image {path}: {error}; set --image-folder to the images' folder") from None

    def batch(self, step: int, size: int) -> list[Example]:
        """Step s's examples: a seeded permutation per pass over the file."""
        count = len(self.records)
        examples = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, count)
            order = list(range(count))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            examples.append(self.example(order[offset]))
        return examples


def validation_examples(data: str, limit: int, image_folder: Path | None = None) -> list[Example]:
    """'testbed' (the fixed validation split) or a file of records, at most `limit` of them."""
    if data == "testbed":
        from pruning_zoo.eval.suite import builtin_suite_folder
        from pruning_zoo.testbed.splits import read_split

        folder = builtin_suite_folder() / "testbed"
        records = read_split(folder, "validation")[:limit]
        return [Example(Image.open(folder / r["image"]).convert("RGB"), r["question"], r["answer"]) for r in records]
    source = FileExamples(Path(data), image_folder, seed=0)
    return [source.example(i) for i in range(min(limit, len(source.records)))]


def training_sources(data: str, validation: str | None, validation_limit: int, image_folder: Path | None,
                     seed: int) -> tuple[SceneExamples | FileExamples, list[Example]]:
    """The training examples and the held-out ones `pruning-zoo train learnpruner` was given: 'testbed' or a file
    each; validation defaults to the testbed's split when training on the testbed, else none."""
    source = SceneExamples(seed) if data == "testbed" else FileExamples(Path(data), image_folder, seed)
    validation = validation or ("testbed" if data == "testbed" else None)
    held_out = validation_examples(validation, validation_limit, image_folder) if validation else []
    return source, held_out


def model_path(model: str) -> str:
    """A local folder or hub id as given; 'testbed': the testbed's reference model."""
    if model == "testbed":
        from pruning_zoo.eval.suite import builtin_suite_folder

        return str(builtin_suite_folder() / "testbed" / "model")
    return model
