"""The leaderboard: a pure function of stored results (folders written by `pruning-zoo run`) to markdown tables
and plots. One table per model, task, device, document limit and latency mode, so latencies from different devices never
share a column; rows by budget, with accuracy beside FLOPs and latency."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from pruning_zoo.errors import PruningZooError
from pruning_zoo.eval.results import finished_cells

#: Frame column -> markdown header, in table order.
TABLE_COLUMNS = {
    "budget": "budget",
    "strategy": "strategy",
    "params": "parameters",
    "score": "score",
    "pct_of_none": "% of unpruned",
    "entering_llm": "tokens entering LLM",
    "average_per_layer": "avg tokens / layer",
    "llm_flops_2ndm": "LLM prefill {unit} (2ndm)",
    "llm_flops_3ndm": "LLM prefill {unit} (3ndm)",
    "vision_flops": "vision {unit}",
    "evidence_recall": "evidence recall",
    "ttft_ms": "TTFT ms",
    "selection_ms": "selection ms",
    "decode_ms_per_token": "decode ms / token",
    "peak_memory_gib": "peak GiB",
}
GROUP = ["model", "task", "device", "limit"]
#: Tables also split by how latency was measured (eager or compiled), so one column never mixes the two.
TABLE_GROUP = [*GROUP, "mode"]
FLOPS_COLUMNS = ["llm_flops_2ndm", "llm_flops_3ndm", "vision_flops"]


def flops_unit(values) -> tuple[float, str]:
    """TFLOPs for real models, GFLOPs for small ones (the testbed's prefill is a few GFLOPs)."""
    largest = max((float(v) for v in values if v is not None and v == v), default=0.0)
    return (1e12, "TFLOPs") if largest >= 1e11 else (1e9, "GFLOPs")


def format_flops(value) -> str:
    if value is None or value != value:
        return "-"
    scale, unit = flops_unit([value])
    return f"{value / scale:.3g}{unit[0]}"


def _budget_order(label: str) -> tuple:
    return (0, 0.0) if label == "all" else (1, -float(label))


def load_results(paths: list[Path], damaged: list[tuple[Path, str]] | None = None) -> pd.DataFrame:
    """One row per sound finished cell; when a cell was stored more than once, the latest run. Damaged cell
    folders are left out and, with `damaged`, listed there."""
    rows = []
    for item in finished_cells(paths, damaged):
        config, metrics = item["config"], item["metrics"]
        cell, latency, flops = config["cell"], metrics["latency"], metrics["flops"]
        rows.append({
            "folder": str(item["folder"]),
            "model": cell["model"], "task": cell["task"], "strategy": cell["strategy"],
            "params": ", ".join(f"{k}={v}" for k, v in sorted(cell["params"].items())) or "defaults",
            "budget": "all" if cell["strategy"] == "none" else str(cell["budget"]),
            "limit": "all" if cell["limit"] is None else str(cell["limit"]),
            "documents": metrics["documents"],
            "metric": metrics["primary_metric"],
            "score": metrics["scores"].get(metrics["primary_metric"]),
            "scores": json.dumps(metrics["scores"]),
            "entering_llm": metrics["visual_tokens"]["entering_llm"],
            "average_per_layer": metrics["visual_tokens"]["average_per_layer"],
            "llm_flops_2ndm": flops["llm_prefill_2ndm"],
            "llm_flops_3ndm": flops["llm_prefill_3ndm"],
            "vision_flops": flops["vision"],
            "evidence_recall": metrics["evidence_recall"],
            "ttft_ms": latency["time_to_first_token_ms"],
            "selection_ms": latency["selection_ms"],
            "decode_ms_per_token": latency["decode_ms_per_token"],
            "peak_memory_gib": None if latency["peak_memory_bytes"] is None else latency["peak_memory_bytes"] / 2**30,
            "device": latency["device"], "clock": latency["clock"], "mode": latency["mode"],
            "batch_size": latency["batch_size"],
            "git_sha": config["git_sha"], "versions": json.dumps(config["versions"], sort_keys=True),
            # Which code of the strategy made the cell (older results predate the record).
            "strategy_code": (config.get("strategy_code") or {}).get("source_sha256"),
            "command": config["command"], "started": config["started"],
        })
    columns = ["folder", *GROUP, "strategy", "params", "budget", "score", "started"]
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    if frame.empty:
        return frame
    frame = frame.sort_values("started").drop_duplicates(GROUP + ["strategy", "params", "budget"], keep="last")
    unpruned = frame[frame["strategy"] == "none"].set_index(GROUP)["score"]
    reference = frame.set_index(GROUP).index.map(lambda key: unpruned.get(key))
    frame["pct_of_none"] = [None if ref is None or score is None or not ref else 100.0 * score / ref
                            for score, ref in zip(frame["score"], reference)]
    frame["budget_order"] = frame["budget"].map(_budget_order)
    return frame.sort_values([*GROUP, "budget_order", "strategy", "params"]).reset_index(drop=True)


def task_metrics(group: pd.DataFrame) -> list[str]:
    """The metric names of a table's cells, in the task's order (the primary one first)."""
    names = [group["metric"].iloc[0]]
    for scores in group["scores"]:
        names += [name for name in json.loads(scores) if name not in names]
    return names


def cell_text(value, digits: int = 4) -> str:
    """A number as a table shows it: `digits` significant digits, whole numbers from 1000 on, '-' when missing."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(parts)).strip("-")


def _versions_text(versions_json: str) -> str:
    return ", ".join(f"{name} {version}" for name, version in json.loads(versions_json).items())


def _provenance(group: pd.DataFrame) -> str:
    shas = ", ".join(sorted(set(group["git_sha"])))
    versions = "; ".join(sorted(_versions_text(v) for v in set(group["versions"])))
    commands = "; ".join(f"`{command}`" for command in sorted(set(group["command"])))
    modes = ", ".join(sorted(set(group["mode"])))
    clocks = ", ".join(sorted(set(group["clock"])))
    batch = ", ".join(str(b) for b in sorted(set(group["batch_size"])))
    if all(mode.startswith("compiled") for mode in group["mode"]):
        fused = f" fused by torch.compile {modes.removeprefix('compiled ')}" if modes.startswith("compiled (") else ""
        timing = (f"TTFT and selection in the compiled mode: the prefill as CUDA-graph segments{fused}, on copies of "
                  "the task's first document, medians after warm-up; decode and memory from the evaluation's batches")
    else:
        timing = f"{modes} transformers; latencies are medians over batches after one warm-up batch"
    return (f"Measured on {group['device'].iloc[0]} ({clocks}, batch size {batch}; {timing}). "
            f"Made by {commands} at git {shas}; versions {versions}.")


def damaged_section(damaged: list[tuple[Path, str]]) -> list[str]:
    """The page's list of result folders it left out, and why."""
    if not damaged:
        return []
    return ["", "## Damaged results, left out", "",
            "These folders hold a result that cannot be read; rerun `pruning-zoo run` with the same options to set "
            "them aside (renamed `*.corrupt`) and evaluate their cells again.", "",
            *[f"- `{folder.name}`: {problem}" for folder, problem in damaged]]


def markdown(frame: pd.DataFrame, plots: dict[tuple, str] | None = None,
             damaged: list[tuple[Path, str]] | None = None) -> str:
    """The whole leaderboard page."""
    lines = [
        "# pruning-zoo leaderboard",
        "",
        "Built by `pruning-zoo leaderboard` from stored results. Each table names the task's lmms-eval metrics; "
        "the first is its score, and % of unpruned compares it against the `none` cell of the same model, task, device and limit. Tokens are per image; "
        "FLOPs are per document, for the prefill, counted as the papers do (multiply-accumulates; 2ndm: two MLP "
        "matrices as FastV, 3ndm: three as TransPrune). TTFT: time to first token, vision encoder, selection and "
        "prefill included; selection: the engine's scoring and selecting alone.",
    ]
    if frame.empty:
        return "\n".join(lines + ["", "No finished results.", *damaged_section(damaged or []), ""])
    for key, group in frame.groupby(TABLE_GROUP, sort=False):
        model, task, device, limit, mode = key
        scale, unit = flops_unit(group[FLOPS_COLUMNS].to_numpy().ravel())
        metric = group["metric"].iloc[0]
        table = group[list(TABLE_COLUMNS)].copy()
        table[FLOPS_COLUMNS] = table[FLOPS_COLUMNS].astype(float) / scale
        headers = {key: header.format(unit=unit) for key, header in TABLE_COLUMNS.items()} | {"score": metric}
        table = table.rename(columns=headers)
        # Every metric the task reports, under its own name, after the first one and its share of the unpruned.
        others = task_metrics(group)[1:]
        parsed = [json.loads(scores) for scores in group["scores"]]  # once per cell, not once per metric
        for offset, name in enumerate(others):
            table.insert(5 + offset, name, [scores.get(name) for scores in parsed])
        text = table.astype(object).apply(lambda column: column.map(cell_text))
        numeric = ["left"] * 3 + ["right"] * (len(table.columns) - 3)
        documents = int(group["documents"].iloc[0])
        lines += [
            "",
            f"## {task}: {model}, {device}" + (f", {mode} latency" if mode.startswith("compiled") else ""),
            "",
            f"{documents} documents{'' if limit == 'all' else f' (the first {limit})'}; score = `{metric}`.",
            "",
            text.to_markdown(index=False, disable_numparse=True, colalign=numeric),
            "",
            _provenance(group),
        ]
        if plots and key in plots:
            lines += ["", f"![{task}: accuracy against FLOPs and latency]({plots[key]})"]
    lines += damaged_section(damaged or [])
    return "\n".join(lines) + "\n"


#: Markers cycled beside the colours, so that lines stay apart in grey print and for colour-blind readers.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def strategy_styles(frame: pd.DataFrame) -> dict[tuple[str, str], dict]:
    """A colour (the colour-blind-safe Tableau 10 palette) and a marker for each pruned strategy and parameter set,
    in sorted order over the whole leaderboard, so that a strategy looks the same in every plot."""
    import matplotlib.style

    colours = matplotlib.style.library["tableau-colorblind10"]["axes.prop_cycle"].by_key()["color"]
    keys = sorted({key for key in zip(frame["strategy"], frame["params"]) if key[0] != "none"})
    return {key: {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)]} for i, key in enumerate(keys)}


def plot_group(group: pd.DataFrame, path: Path, styles: dict[tuple[str, str], dict] | None = None) -> None:
    """Score against the LLM's prefill FLOPs (2ndm, the table's convention) and against TTFT: one line per strategy
    and parameters over budgets, the unpruned model as a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = styles or strategy_styles(group)
    figure, axes = plt.subplots(1, 2, figsize=(14, 4.6), constrained_layout=True)
    flops = group["llm_flops_2ndm"].astype(float)
    scale, unit = flops_unit(flops)
    flops_label = TABLE_COLUMNS["llm_flops_2ndm"].format(unit=unit) + " per document"  # the table's own column
    for axis, x, label in ((axes[0], flops / scale, flops_label),
                           (axes[1], group["ttft_ms"].astype(float), f"time to first token, ms ({group['device'].iloc[0]})")):
        for (strategy, params), rows in group.groupby(["strategy", "params"], sort=True):
            xs, ys = x[rows.index], rows["score"].astype(float)
            if strategy == "none":
                axis.scatter(xs, ys, marker="*", s=180, color="black", label="none (unpruned)", zorder=3)
            else:
                order = xs.argsort()
                name = strategy if params == "defaults" else f"{strategy} ({params})"
                axis.plot(xs.iloc[order], ys.iloc[order], label=name, markersize=7, linewidth=1.6,
                          **styles[(strategy, params)])
        axis.set_xlabel(label)
        axis.set_ylabel(f"score ({group['metric'].iloc[0]})")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(f"{group['task'].iloc[0]}: {group['model'].iloc[0]}", fontsize=10)
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)


def build(paths: list[Path], output: Path, damaged: list[tuple[Path, str]] | None = None) -> tuple[Path, pd.DataFrame]:
    """Write `output/leaderboard.md`, `output/leaderboard.csv` and `output/plots/*.png`; returns the page's path.
    Damaged result folders are left out, listed on the page and, with `damaged`, there."""
    damaged = [] if damaged is None else damaged
    frame = load_results(paths, damaged)
    if frame.empty:
        found = f" ({len(damaged)} damaged result folders: {', '.join(str(f) for f, _ in damaged)})" if damaged else ""
        raise PruningZooError(f"no finished results under {', '.join(map(str, paths))}{found}; run `pruning-zoo run` first")
    output.mkdir(parents=True, exist_ok=True)
    plots = {}
    (output / "plots").mkdir(exist_ok=True)
    styles = strategy_styles(frame)
    for key, group in frame.groupby(TABLE_GROUP, sort=False):
        name = f"plots/{_slug(*key[:-1])}{'__compiled' if key[-1] == 'compiled' else ''}.png"
        plot_group(group, output / name, styles)
        plots[key] = name
    page = output / "leaderboard.md"
    page.write_text(markdown(frame, plots, damaged))
    frame.drop(columns=["budget_order"], errors="ignore").to_csv(output / "leaderboard.csv", index=False)
    return page, frame
