"""Local copies of the image-VQA suite's hub datasets, made from the testbed's scenes and questions.

Each copy is a folder laid out as its hub repository (`lmms-lab-encoder/GQA/testdev_balanced_instructions/
testdev-00000-of-00001.parquet`, a README.md whose `configs:` map configs and splits to files), with the columns,
types, configs and splits of the real dataset (docs/real-datasets.md cites the dataset cards), so that lmms-eval's own
task runs on it unchanged: `pruning-zoo run --suite image-vqa-local`. Only the split each task reads is written.

The documents are the testbed's test questions recast in each benchmark's form (GQA's open questions, MME's
yes/no pairs per image, POPE's three ways of choosing absent objects, TextVQA's ten answers, ScienceQA's and
MMBench's multiple choice with MMBench's circular copies), so the testbed model can answer some and the metrics are
exercised; the images are the testbed's, embedded as JPEG as the hub's parquet files embed theirs.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import PIL.Image
from datasets import Features, Image, List, Value

from pruning_zoo.testbed.questions import NUMBERS
from pruning_zoo.testbed.scenes import COLORS, SHAPES, SIZE, generate_scene

#: One split of one config: (repository, config, split) -> features, rows.
Table = tuple[str, str, str]

_ANNOTATION = {"objectId": Value("string"), "value": Value("string")}
FEATURES: dict[Table, Features] = {
    ("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev"): Features({
        "id": Value("string"), "imageId": Value("string"), "question": Value("string"), "answer": Value("string"),
        "fullAnswer": Value("string"), "isBalanced": Value("bool"),
        "groups": {"global": Value("string"), "local": Value("string")},
        "entailed": Value("string"), "equivalent": Value("string"),
        "types": {"structural": Value("string"), "semantic": Value("string"), "detailed": Value("string")},
        "annotations": {"question": List(_ANNOTATION), "answer": List(_ANNOTATION), "fullAnswer": List(_ANNOTATION)},
        "semantic": List({"operation": Value("string"), "argument": Value("string"), "dependencies": List(Value("int32"))}),
        "semanticStr": Value("string"),
    }),
    ("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev"): Features({"id": Value("string"), "image": Image()}),
    ("lmms-lab-encoder/MME", "default", "test"): Features({
        "question_id": Value("string"), "image": Image(), "question": Value("string"), "answer": Value("string"),
        "category": Value("string"),
    }),
    ("lmms-lab-encoder/POPE", "default", "test"): Features({
        "id": Value("string"), "question_id": Value("string"), "question": Value("string"), "answer": Value("string"),
        "image_source": Value("string"), "image": Image(), "category": Value("string"),
    }),
    ("lmms-lab-encoder/textvqa", "default", "validation"): Features({
        "image_id": Value("string"), "question_id": Value("int32"), "question": Value("string"),
        "question_tokens": List(Value("string")), "image": Image(), "image_width": Value("int32"),
        "image_height": Value("int32"), "flickr_original_url": Value("string"), "flickr_300k_url": Value("string"),
        "answers": List(Value("string")), "image_classes": List(Value("string")), "set_name": Value("string"),
        "ocr_tokens": List(Value("string")),
    }),
    ("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"): Features({
        "image": Image(), "question": Value("string"), "choices": List(Value("string")), "answer": Value("int8"),
        **{name: Value("string") for name in
           ("hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")},
    }),
    ("lmms-lab-encoder/MMBench", "en", "dev"): Features({
        "index": Value("int64"), "question": Value("string"), "hint": Value("string"), "answer": Value("string"),
        "A": Value("string"), "B": Value("string"), "C": Value("string"), "D": Value("string"),
        "category": Value("string"), "image": Image(), "source": Value("string"), "L2-category": Value("string"),
        "comment": Value("string"), "split": Value("string"),
    }),
}
#: Where each table's parquet file lies in its repository, as on the hub.
FILES: dict[Table, str] = {
    ("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev"): "testdev_balanced_instructions/testdev-00000-of-00001.parquet",
    ("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev"): "testdev_balanced_images/testdev-00000-of-00001.parquet",
    ("lmms-lab-encoder/MME", "default", "test"): "data/test-00000-of-00001.parquet",
    ("lmms-lab-encoder/POPE", "default", "test"): "data/test-00000-of-00001.parquet",
    ("lmms-lab-encoder/textvqa", "default", "validation"): "data/validation-00000-of-00001.parquet",
    ("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"): "ScienceQA-IMG/test-00000-of-00001.parquet",
    ("lmms-lab-encoder/MMBench", "en", "dev"): "en/dev-00000-of-00001.parquet",
}
#: Benchmark-style form of a testbed question ("what color is the triangle ?" -> "What color is the triangle?").
MME_PERCEPTION, MME_COGNITION = ("existence", "position", "count"), ("numerical_calculation",)


def sentence(question: str) -> str:
    text = question.replace(" ?", "?")
    return text[0].upper() + text[1:]


class Source:
    """The testbed's test split: its questions, their scenes' objects and images."""

    def __init__(self, folder: Path):
        self.folder = folder
        lines = (folder / "test.jsonl").read_text().splitlines()
        self.questions = [json.loads(line) for line in lines if line.strip()]
        self._scenes: dict[int, object] = {}
        self._images: dict[Path, bytes] = {}

    def family(self, name: str) -> list[dict]:
        return [q for q in self.questions if q["family"] == name]

    def scene(self, seed: int):
        if seed not in self._scenes:
            self._scenes[seed] = generate_scene(seed)
        return self._scenes[seed]

    def image(self, record: dict) -> dict:
        """The scene's image as JPEG (quality 90), as most of these hub datasets store theirs: a third of the PNG's
        size, so the copies stay small enough to carry."""
        path = self.folder / record["image"]
        if path not in self._images:
            encoded = io.BytesIO()
            PIL.Image.open(path).convert("RGB").save(encoded, format="JPEG", quality=90)
            self._images[path] = encoded.getvalue()
        return {"bytes": self._images[path], "path": f"{path.stem}.jpg"}


def _spread(records: list[dict], count: int) -> list[dict]:
    """`count` records spread evenly over the list (scenes vary; the same input gives the same choice)."""
    step = max(1, len(records) // count)
    return records[::step][:count]


def gqa(source: Source, count: int) -> dict[Table, list[dict]]:
    families = ("attribute", "existence", "counting", "spatial", "reading")
    chosen = sorted((q for family in families for q in _spread(source.family(family), count // len(families))),
                    key=lambda q: q["id"])
    structural = {"attribute": "query", "existence": "verify", "counting": "query", "spatial": "verify", "reading": "query"}
    semantic = {"attribute": "attr", "existence": "obj", "counting": "obj", "spatial": "rel", "reading": "attr"}
    rows, images = [], {}
    for number, q in enumerate(chosen):
        question_id = str(20000000 + number)
        image_id = f"n{q['scene_seed']}"
        images[image_id] = source.image(q)
        rows.append({
            "id": question_id, "imageId": image_id, "question": sentence(q["question"]), "answer": q["answer"],
            "fullAnswer": f"The answer is {q['answer']}.", "isBalanced": True,
            "groups": {"global": q["family"], "local": f"{q['family']}-{q['answer']}"},
            "entailed": "[]", "equivalent": json.dumps([question_id]),
            "types": {"structural": structural[q["family"]], "semantic": semantic[q["family"]], "detailed": q["family"]},
            "annotations": {"question": [], "answer": [], "fullAnswer": []},
            "semantic": [{"operation": "select", "argument": q["question"], "dependencies": []}],
            "semanticStr": f"select: {q['question']}",
        })
    image_rows = [{"id": key, "image": value} for key, value in sorted(images.items())]
    return {("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "testdev"): rows,
            ("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev"): image_rows}


def _absent_object(scene, rng: random.Random) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in scene.objects}
    return rng.choice(sorted((c, s) for c in COLORS for s in SHAPES if (c, s) not in present))


def mme(source: Source, count: int) -> dict[Table, list[dict]]:
    """Two questions per image, one answered Yes and one No, as MME pairs them (its score needs both)."""
    rng = random.Random(0)
    categories = (*MME_PERCEPTION, *MME_COGNITION)
    per_category = max(1, count // (2 * len(categories)))
    seeds = sorted({q["scene_seed"]: q for q in source.questions}.items())
    pairs: list[list[dict]] = [[] for _ in categories]
    for index, category in enumerate(categories):
        for seed, record in seeds[index * per_category : (index + 1) * per_category]:
            scene = source.scene(seed)
            names = [o.name for o in scene.objects]
            obj = next(o for o in scene.objects if names.count(o.name) == 1)  # unambiguous to ask about
            if category == "existence":
                color, shape = _absent_object(scene, rng)
                pair = [(f"Is there a {obj.color} {obj.shape} in the image?", "Yes"),
                        (f"Is there a {color} {shape} in the image?", "No")]
            elif category == "position":
                side = "left" if obj.x < SIZE / 2 else "right"
                other = "right" if side == "left" else "left"
                pair = [(f"Is the {obj.color} {obj.shape} in the {side} half of the image?", "Yes"),
                        (f"Is the {obj.color} {obj.shape} in the {other} half of the image?", "No")]
            else:
                number = sum(o.color == obj.color for o in scene.objects)
                wrong = number + 1 if number < len(NUMBERS) else number - 1
                ask = ("Are there {n} {color} objects in the image?" if category == "count"
                       else "Is the number of {color} objects {n}?")
                pair = [(ask.format(n=NUMBERS[number - 1], color=obj.color), "Yes"),
                        (ask.format(n=NUMBERS[wrong - 1], color=obj.color), "No")]
            pairs[index].append([{"question_id": f"{category}/{seed}.png", "image": source.image(record),
                                  "question": f"{question} Please answer yes or no.", "answer": answer,
                                  "category": category} for question, answer in pair])
    # Pair by pair, the categories in turn: the first documents (--limit) cover every category, whole pairs.
    rows = [row for turn in zip(*pairs) for pair in turn for row in pair]
    return {("lmms-lab-encoder/MME", "default", "test"): rows}


def pope(source: Source, count: int) -> dict[Table, list[dict]]:
    """Existence questions, half answered no, in POPE's three categories (how the absent object was chosen); the
    yes questions are dealt to the categories in turn."""
    existence = source.family("existence")
    per_category = max(1, count // 6)
    yeses = [q for q in existence if q["answer"] == "yes"]
    rows = []
    for turn, kind in enumerate(("adversarial", "popular", "random")):
        noes = [q for q in existence if q["negative"] == kind][:per_category]
        for q in sorted(noes + yeses[turn::3][:per_category], key=lambda q: q["id"]):
            rows.append({"id": str(len(rows)), "question_id": str(len(rows) + 1),
                         "question": sentence(q["question"]).replace("?", " in the image?"), "answer": q["answer"],
                         "image_source": f"testbed_{q['scene_seed']}", "image": source.image(q), "category": kind})
    return {("lmms-lab-encoder/POPE", "default", "test"): rows}


def textvqa(source: Source, count: int) -> dict[Table, list[dict]]:
    rows = []
    for number, q in enumerate(_spread(source.family("reading"), count)):
        answer = q["answer"]
        # Ten answers as ten annotators give them: lmms-eval normalises case and punctuation before comparing.
        answers = [answer] * 6 + [answer.upper()] * 2 + [f"{answer}."] * 2
        rows.append({
            "image_id": f"{q['scene_seed']:016x}", "question_id": 34602 + number, "question": sentence(q["question"]),
            "question_tokens": q["question"].replace(" ?", "").split(), "image": source.image(q),
            "image_width": SIZE, "image_height": SIZE, "flickr_original_url": "", "flickr_300k_url": "",
            "answers": answers, "image_classes": ["Shape", "Text"], "set_name": "val", "ocr_tokens": [answer],
        })
    return {("lmms-lab-encoder/textvqa", "default", "validation"): rows}


def _choices(q: dict, size: int, rng: random.Random) -> list[str]:
    pool = list(COLORS) if q["question"].startswith("what color") else list(SHAPES)
    others = rng.sample(sorted(set(pool) - {q["answer"]}), size - 1)
    choices = [q["answer"], *others]
    rng.shuffle(choices)
    return choices


def scienceqa(source: Source, count: int) -> dict[Table, list[dict]]:
    rng = random.Random(1)
    rows = []
    for q in _spread(source.family("attribute"), count):
        choices = _choices(q, 3, rng)
        topic = "colors" if q["question"].startswith("what color") else "shapes"
        rows.append({
            "image": source.image(q), "question": sentence(q["question"]), "choices": choices,
            "answer": choices.index(q["answer"]), "hint": "", "task": "closed choice", "grade": "grade1",
            "subject": "natural science", "topic": topic, "category": f"Identify {topic}", "skill": f"Identify {topic}",
            "lecture": "", "solution": f"The answer is {q['answer']}.",
        })
    return {("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "test"): rows}


def mmbench(source: Source, count: int) -> dict[Table, list[dict]]:
    """Multiple choice with MMBench's circular copies: every question again with its options rotated and the answer
    letter moved along (index + k * 1e6), as its dev split holds them; a question counts only if every copy is
    answered right. Four-option attribute questions and, as MMBench also has, two-option yes/no ones."""
    rng = random.Random(2)
    letters = "ABCD"
    attribute = [(q, _choices(q, 4, rng), "attribute_recognition", "Fine-grained Single-instance Perception")
                 for q in _spread(source.family("attribute"), max(1, count // 8))]
    yes_no = [(q, ["yes", "no"] if rng.random() < 0.5 else ["no", "yes"], category, level)
              for family, category, level in (("existence", "object_localization", "Coarse Perception"),
                                              ("spatial", "spatial_relationship", "Relation Reasoning"))
              for q in _spread(source.family(family), max(1, count // 8))]
    rows = []
    for index, (q, choices, category, level) in enumerate(attribute + yes_no):
        for shift in range(len(choices)):
            rotated = choices[shift:] + choices[:shift]
            options = dict(zip(letters, rotated + [None] * (4 - len(rotated))))
            rows.append({
                "index": index + shift * 1_000_000, "question": sentence(q["question"]), "hint": None,
                "answer": letters[rotated.index(q["answer"])], **options, "category": category,
                "image": source.image(q), "source": "pruning-zoo testbed", "L2-category": level, "comment": None,
                "split": "dev",
            })
    return {("lmms-lab-encoder/MMBench", "en", "dev"): rows}


#: lmms-eval task -> the builder of its dataset's copy.
TASKS: dict[str, Callable[[Source, int], dict[Table, list[dict]]]] = {
    "gqa": gqa, "mme": mme, "pope": pope, "textvqa_val": textvqa, "scienceqa_img": scienceqa,
    "mmbench_en_dev": mmbench,
}


def readme(repository: str, tables: dict[Table, datasets.Dataset], folder: Path) -> str:
    """The dataset card as the hub writes it: `configs:` mapping configs and splits to files (what `load_dataset`
    reads) and `dataset_info` (features, sizes). datasets keys its cache of a local folder by this card, so the sizes
    also make a changed copy a new cache entry."""
    from datasets.info import DatasetInfosDict
    from datasets.splits import SplitDict
    from huggingface_hub import DatasetCardData

    configs: dict[str, list[dict]] = {}
    infos = {}
    for (_, config, split), table in tables.items():
        path = FILES[(repository, config, split)]
        configs.setdefault(config, []).append({"split": split, "path": f"{path.rsplit('/', 1)[0]}/{split}-*"})
        splits = SplitDict()
        splits.add(datasets.SplitInfo(name=split, num_bytes=table.data.nbytes, num_examples=len(table)))
        size = (folder / path).stat().st_size
        infos[config] = datasets.DatasetInfo(features=table.features, splits=splits, download_size=size,
                                             dataset_size=table.data.nbytes)
    card = DatasetCardData(configs=[{"config_name": name, "data_files": files} for name, files in configs.items()])
    DatasetInfosDict(infos).to_dataset_card_data(card)
    return (f"---\n{card.to_yaml()}\n---\n\n# {repository}, a local copy made from the pruning-zoo testbed\n\n"
            f"The columns, types, configs and split names of the hub dataset `{repository}` (only the splits "
            "lmms-eval's tasks read), with documents made from the testbed's test scenes and questions by "
            "`pruning-zoo testbed hub-copies` (pruning_zoo/testbed/hub_copies.py). Not the real benchmark: its "
            "scores measure the testbed model, not a published one.\n")


def write_copies(testbed: Path, output: Path, documents: int = 40) -> dict[Table, int]:
    """Write every task's copy under `output/OWNER/NAME`; returns the rows of each table. Deterministic: the same
    testbed gives the same rows."""
    source = Source(testbed)
    rows: dict[Table, list[dict]] = {}
    for build in TASKS.values():
        rows.update(build(source, documents))
    for repository in sorted({table[0] for table in rows}):
        folder = output / repository
        if folder.exists():
            shutil.rmtree(folder)
        tables = {}
        for table in (t for t in rows if t[0] == repository):
            path = folder / FILES[table]
            path.parent.mkdir(parents=True, exist_ok=True)
            tables[table] = datasets.Dataset.from_list(rows[table], features=FEATURES[table])
            tables[table].to_parquet(str(path))
        (folder / "README.md").write_text(readme(repository, tables, folder))
    return {table: len(table_rows) for table, table_rows in rows.items()}
