"""lmms-eval hooks of the testbed task (testbed.yaml): images from this folder, the question as the prompt,
exact-match accuracy overall and per question family."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
FAMILIES = ("attribute", "existence", "counting", "spatial", "reading")


def doc_to_visual(doc: dict) -> list:
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    words = results[0].strip().lower().split()
    correct = float(bool(words) and words[0] == doc["answer"])
    row = {"id": doc["id"], "family": doc["family"], "correct": correct}
    return {"accuracy": correct, **{f"{family}_accuracy": row for family in FAMILIES}}


def _family_mean(family: str):
    def aggregate(rows: list[dict]) -> float:
        mine = [row["correct"] for row in rows if row["family"] == family]
        return sum(mine) / len(mine) if mine else float("nan")

    aggregate.__name__ = f"aggregate_{family}"
    return aggregate


aggregate_attribute = _family_mean("attribute")
aggregate_existence = _family_mean("existence")
aggregate_counting = _family_mean("counting")
aggregate_spatial = _family_mean("spatial")
aggregate_reading = _family_mean("reading")
