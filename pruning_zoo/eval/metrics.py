"""What an evaluated cell records from lmms-eval's results: its metrics.json (scores, visual tokens, FLOPs,
evidence recall, latency, the compiled mode's latency laid over the eager one), its per-sample records, and
which task definition ran on what data."""

from __future__ import annotations

import statistics

from pruning_zoo.eval.datasources import TaskData
from pruning_zoo.eval.results import Cell

HOW_TOKENS = ("Visual tokens per image: before pruning, entering the LLM, and averaged over decoder layers, "
              "from the engine's record of the prefill (means over the task's images).")
HOW_FLOPS = ("Prefill FLOPs per document from the tokens each decoder layer processed (flops.py: multiply-accumulates, "
             "as the papers count them; 2ndm = two MLP matrices as FastV, 3ndm = three as TransPrune); the vision "
             "tower and projector separately, from the crops and patches that ran. Means over documents.")
#: Batches whose timings are left out of the medians: the first one warms kernels and allocators.
WARMUP_BATCHES = 1


def task_record(data: TaskData | None, results: dict, task: str) -> dict:
    """Which task definition ran and on what data: lmms-eval's own YAML and functions, the dataset and its copy."""
    config = (results.get("configs") or {}).get(task) or {}
    record = {"name": task, "yaml_path": data.yaml_path if data else None,
              "dataset_path": data.dataset_path if data else None, "dataset_name": data.dataset_name if data else None,
              "split": data.split if data else None, "local_copy": str(data.local) if data and data.local else None,
              "metrics": [entry.get("metric") for entry in config.get("metric_list") or []]}
    record["functions"] = dict(data.hooks) if data else {}
    return record


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def task_scores(task_results: dict) -> dict[str, float | None]:
    """lmms-eval's 'metric,filter' entries without standard errors, by metric name."""
    scores = {}
    for key, value in task_results.items():
        metric, comma, _ = key.partition(",")
        if comma and "_stderr" not in metric and isinstance(value, (int, float)):
            scores.setdefault(metric, value)
    return scores


def latency_summary(timings: list[dict], device: str, clock_kind: str, batch_size: int) -> dict:
    timed = timings[WARMUP_BATCHES:] if len(timings) > WARMUP_BATCHES else timings
    shares = [t["selection_ms"] / t["time_to_first_token_ms"] for t in timed if t["time_to_first_token_ms"]]
    return {
        "device": device, "clock": clock_kind, "mode": "eager", "batch_size": batch_size, "batches": len(timings),
        "timed_batches": len(timed),
        "time_to_first_token_ms": _median([t["time_to_first_token_ms"] for t in timed]),
        "selection_ms": _median([t["selection_ms"] for t in timed]),
        "selection_share_of_ttft": _median(shares),
        "decode_ms_per_token": _median([t["decode_ms_per_token"] for t in timed]),
        "peak_memory_bytes": max((t["peak_memory_bytes"] for t in timings if t["peak_memory_bytes"] is not None), default=None),
        "how": (f"Per batch of up to {batch_size} documents, measured with {clock_kind}, eager transformers: time to "
                "first token from the generate() call to the first new token on the host (vision encoder, selection "
                "and prefill; the processor's CPU preprocessing excluded); selection = the engine's scoring, selecting "
                "and gathering; decode = time per further token. Medians over batches, the first "
                f"{WARMUP_BATCHES} left out as warm-up when there are more; peak memory = the largest "
                "torch.cuda.max_memory_allocated of a batch (GPU only)."),
    }


def cell_metrics(cell: Cell, results: dict, lm, device: str) -> tuple[dict, list[dict]]:
    """metrics.json and the per-sample records of one evaluated cell."""
    task_results = results["results"].get(cell.task) or next(iter(results["results"].values()))
    scores = task_scores(task_results)
    samples = []
    for task, rows in sorted((results.get("samples") or {}).items()):
        for row in rows:
            doc = row.get("doc") or {}
            measured = lm.document_measurements.get((task, row["doc_id"]), {})
            prediction = row.get("filtered_resps", [None])[0]
            samples.append({
                "task": task, "doc_id": row["doc_id"], "id": doc.get("id") if isinstance(doc, dict) else None,
                "target": row.get("target"), "prediction": prediction,
                **{name: row[name] for name in scores if isinstance(row.get(name), (int, float))},
                **measured,
            })
    measured = list(lm.document_measurements.values())
    with_images = [m for m in measured if m["images"]]
    images = sum(m["images"] for m in with_images) or None
    metrics = {
        "task": cell.task,
        "documents": len(samples),
        "primary_metric": next(iter(scores), None),
        "scores": scores,
        "visual_tokens": {
            "per_image": sum(m["visual_tokens"] for m in with_images) / images if images else None,
            "entering_llm": sum(m["entering_llm"] for m in with_images) / images if images else None,
            "average_per_layer": sum(m["average_per_layer"] for m in with_images) / images if images else None,
            "budget_counts": lm.strategy.budget_meaning.value,
            "how": HOW_TOKENS,
        },
        "flops": {
            "llm_prefill_2ndm": _mean([m["llm_prefill_flops_2ndm"] for m in measured]),
            "llm_prefill_3ndm": _mean([m["llm_prefill_flops_3ndm"] for m in measured]),
            "vision": _mean([m["vision_flops"] for m in measured]),
            "how": HOW_FLOPS,
        },
        "evidence_recall": _mean([m["evidence_recall"] for m in measured]),
        "latency": latency_summary(lm.batch_timings, device, lm.clock_kind, cell.batch_size),
    }
    return metrics, samples


def with_compiled_latency(eager: dict, compiled: dict) -> dict:
    """The latency summary with the compiled mode's time to first token and selection in front and the eager
    ones kept under `eager` (decode time and peak memory stay the evaluation's own)."""
    if "error" in compiled:
        return {**eager, "compiled_error": compiled["error"]}
    kept = {key: eager[key] for key in ("time_to_first_token_ms", "selection_ms", "selection_share_of_ttft")}
    fused = f", their layers fused by torch.compile ({compiled['fusion']})" if compiled.get("fusion") else ""
    return {
        # Fused and unfused compiled latencies differ: the mode names the fusion, so no table mixes them.
        **eager, **{key: compiled[key] for key in kept}, "eager": kept,
        "mode": f"compiled ({compiled['fusion']})" if compiled.get("fusion") else "compiled",
        "eager_segments": compiled["eager_segments"], "fusion": compiled.get("fusion"),
        "how": (f"Time to first token and selection: the compiled mode (the prefill as CUDA-graph segments, "
                f"pruning_zoo.bench.segmented{fused}; on a CPU the segments run eagerly) on {eager['batch_size']} copies of the "
                f"task's first document, medians of {compiled['repeats']} after warm-up, with the evaluation's clock. "
                + eager["how"].replace("Per batch", "`eager`, and decode and memory: per batch")),
    }
