"""Accuracy and evidence recall of a pruning strategy on a testbed split, through the engine and the model's
own processor and generate(): each question's greedy answer is compared with the true one, and the patches
the strategy kept with the question's evidence patches."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from PIL import Image

from pruning_zoo.engine.run import prune
from pruning_zoo.errors import InvalidParameterError
from pruning_zoo.strategy import BudgetMeaning, PruningStrategy, ScoreContext, Stage
from pruning_zoo.strategy.budget import Budget
from pruning_zoo.testbed.model import prompt


class EvidenceOracle(PruningStrategy):
    """Not a method: before the LLM, keep each image's evidence patches first, then others at random (seeded).
    Shows what a perfect selection keeps; it reads the answer's evidence, which no real strategy has."""

    name = "oracle"
    budget_meaning = BudgetMeaning.ENTERING_LLM

    def __init__(self, seed: int = 0):
        super().__init__({"positions": "keep"})
        self.generator = torch.Generator().manual_seed(seed)
        self.evidence: list[list[int]] = []
        self._next = 0

    def for_batch(self, evidence: list[list[int]]) -> None:
        self.evidence, self._next = evidence, 0

    def plan(self, budget: int, num_visual: int, num_layers: int) -> tuple[Stage, ...]:
        return (Stage(after_layer=None, keep=budget),)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        scores = torch.rand(ctx.tokens.shape[0], generator=self.generator)
        scores[self.evidence[self._next]] += 1.0
        self._next += 1
        return scores


def evidence_recall(evidence: list[int], kept: list[int]) -> float | None:
    """Share of the evidence patches among the kept ones; None when a question has no evidence."""
    if not evidence:
        return None
    return len(set(evidence) & set(kept)) / len(evidence)


def load_reference(folder: Path):
    try:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - a damaged folder, whatever transformers raises for it
        raise InvalidParameterError(f"--model {folder} cannot be loaded ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''}); give a folder saved by "
                                    "`pruning-zoo testbed train`") from None
    return model, processor


@torch.no_grad()
def evaluate(model, processor, records: list[dict], data_folder: Path, strategy: PruningStrategy, budget: Budget,
             batch_size: int = 16) -> list[dict]:
    """One result per question: prediction, correctness, evidence recall and the visual tokens kept."""
    results = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        images = [Image.open(data_folder / r["image"]).convert("RGB") for r in batch]
        inputs = processor(images=images, text=[prompt(r["question"]) for r in batch], padding=True, return_tensors="pt")
        if isinstance(strategy, EvidenceOracle):
            strategy.for_batch([r["evidence"] for r in batch])
        with prune(model, strategy, budget) as run:
            output = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        answers = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        (record,) = run.records
        for r, answer, image in zip(batch, answers, record.images):
            prediction = answer.strip()
            results.append({
                "id": r["id"], "family": r["family"], "answer": r["answer"], "prediction": prediction,
                "correct": prediction == r["answer"], "evidence_recall": evidence_recall(r["evidence"], image.kept),
                "entering_llm": image.entering_llm, "average_per_layer": image.average_per_layer,
            })
    return results


def summarise(results: list[dict]) -> dict:
    """Accuracy overall and per family, and mean evidence recall over questions that have evidence."""
    by_family = defaultdict(list)
    for r in results:
        by_family[r["family"]].append(r)

    def accuracy(rows):
        return sum(r["correct"] for r in rows) / len(rows)

    recalls = [r["evidence_recall"] for r in results if r["evidence_recall"] is not None]
    return {
        "questions": len(results),
        "accuracy": accuracy(results),
        "accuracy_by_family": {family: accuracy(rows) for family, rows in sorted(by_family.items())},
        "evidence_recall": sum(recalls) / len(recalls) if recalls else None,
        "entering_llm": sum(r["entering_llm"] for r in results) / len(results),
        "average_per_layer": sum(r["average_per_layer"] for r in results) / len(results),
    }


def sample(records: list[dict], count: int | None, seed: int = 0) -> list[dict]:
    """A fixed subset (the same for every strategy), or all records."""
    if count is None or count >= len(records):
        return records
    return sorted(random.Random(seed).sample(records, count), key=lambda r: r["id"])


def new_report(command: str, model: Path, split: str, budget: Budget) -> dict:
    """An evaluation report with its provenance and no results yet (`add_result` fills them in)."""
    from pruning_zoo.provenance import git_sha, versions

    return {"command": command, "git_sha": git_sha(), "model": str(model), "split": split, "budget": budget,
            "device": "cpu", "threads": torch.get_num_threads(), "versions": versions(), "results": {}}


def add_result(report: dict, name: str, strategy: PruningStrategy, rows: list[dict]) -> dict:
    """Store one strategy's per-question rows and their summary in the report; returns the summary."""
    summary = summarise(rows)
    report["results"][name] = {"params": str(strategy.params), "summary": summary, "questions": rows}
    return summary


def write_report(report: dict, output: Path) -> None:
    """The report as JSON (whole or not at all) and its summaries as markdown beside it (OUTPUT.md)."""
    import json

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    temporary.replace(output)
    output.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The summaries of an evaluation report as a markdown table, with how they were measured."""
    import pandas as pd

    rows = []
    for name, result in report["results"].items():
        summary = result["summary"]
        row = {"strategy": name, "parameters": result["params"], "accuracy": summary["accuracy"], "evidence recall": summary["evidence_recall"],
               "entering LLM": summary["entering_llm"], "average per layer": summary["average_per_layer"]}
        row.update(summary["accuracy_by_family"])
        rows.append(row)
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f")
    questions = next(iter(report["results"].values()))["summary"]["questions"]
    return (
        f"Testbed {report['split']} split, {questions} questions, budget {report['budget']} visual tokens per image "
        f"('none' keeps all 576). Accuracy is exact match of the greedy answer; evidence recall is the share of each "
        f"question's evidence patches among the kept ones (questions without evidence left out). Measured on CPU "
        f"with `{report['command']}` (torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}).\n\n{table}\n"
    )
