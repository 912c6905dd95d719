"""The latency benchmark's page: provenance, the issue's targets checked, and per batch a table of every strategy
and budget, eager and compiled; and the line the command prints per measured cell."""

from __future__ import annotations

import collections

#: What the compiled cells of git 1a76c3f and a9b821f fused; later cells list their own parts.
UNLISTED_FUSED_PARTS = ("decoder layers", "vision blocks")


def frame(results: dict):
    """One row per measured cell."""
    import pandas as pd

    rows = []
    for entry in results["cells"]:
        cell = entry["cell"]
        rows.append({
            "batch": cell["batch"], "strategy": cell["strategy"], "budget": cell["budget"], "mode": cell["mode"],
            "ttft_ms": entry.get("ttft_ms"), "selection_ms": entry.get("selection_ms"),
            "selection_share": entry.get("selection_share"), "vision_ms": entry.get("vision_ms"),
            "llm_ms": entry.get("llm_ms"), "decode_ms_per_token": entry.get("decode_ms_per_token"),
            "peak_memory_gib": entry.get("peak_memory_gib"),
            "tflops": (entry["flops"]["vision"] + entry["flops"]["llm"]) / 1e12 if "flops" in entry else None,
            "llm_flops": entry["flops"]["llm"] if "flops" in entry else None,
            "floor_ms": entry.get("floor_ms"), "ttft_over_floor": entry.get("ttft_over_floor"),
            "eager_segments": ", ".join(entry.get("eager_segments", {})), "error": entry.get("error", ""),
            "fusion": cell.get("fusion"),
        })
    return pd.DataFrame(rows)


def _get(row, key):
    """A cell's value, None where the row or the value is missing (NaN in the frame)."""
    if row is None:
        return None
    value = row.get(key)
    return None if value is None or value != value else value


def _number(value, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _runs(results: dict) -> list[str]:
    """One line per run that made cells on the page: its command and commit, and how many cells it made. Older
    cells, which did not record their command, are counted by commit; the file's git history holds those commands."""
    runs = collections.Counter((entry.get("command"), entry.get("git_sha")) for entry in results["cells"])
    lines = []
    for (command, sha), cells in sorted(runs.items(), key=lambda item: (item[0][0] is not None, str(item[0]))):
        made = f"{cells} cell{'s' * (cells != 1)}"
        if command is None:
            lines.append(f"  - git `{sha}`: {made}, command not recorded in the cells (see this file's git history)")
        else:
            lines.append(f"  - `{command}` at git `{sha}`: {made}")
    return lines


def _times(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, checked against the measured cells: (target, measured, met)."""
    table = frame(results)
    if table.empty:
        return []
    compiled = table[(table["mode"] == "compiled") & table["ttft_ms"].notna()]
    checks = []

    def unpruned(batch):
        rows = compiled[(compiled["strategy"] == "none") & (compiled["batch"] == batch)]
        return None if rows.empty else rows.iloc[0]

    base = unpruned(1)
    if base is not None and base["ttft_over_floor"] == base["ttft_over_floor"] and base["ttft_over_floor"] is not None:
        checks.append(("unpruned TTFT within 1.5x of its floor (batch 1, compiled)",
                       f"{base['ttft_ms']:.2f} ms = {base['ttft_over_floor']:.2f}x the {base['floor_ms']:.2f} ms floor",
                       bool(base["ttft_over_floor"] <= 1.5)))
    pre_llm = ("random", "pool", "visionzip")
    for name in pre_llm:
        rows = compiled[(compiled["strategy"] == name) & (compiled["budget"] == 64) & (compiled["batch"] == 1)]
        if base is not None and not rows.empty:
            speedup = base["ttft_ms"] / rows.iloc[0]["ttft_ms"]
            checks.append((f"{name} at 64 tokens, batch 1: TTFT speedup >= 2.0x", f"{speedup:.2f}x", bool(speedup >= 2.0)))
    if not compiled.empty:
        worst = compiled.loc[compiled["selection_share"].idxmax()]
        checks.append(("selection <= 3% of TTFT, every strategy (compiled)",
                       f"largest {worst['selection_share']:.1%}: {worst['strategy']} at {worst['budget']}, batch {worst['batch']}",
                       bool(worst["selection_share"] <= 0.03)))
    # "Prefill" as the issue uses the word: the LLM's prefill, which TTFT adds to the vision tower and selection.
    # TTFT's ratio is shown beside it: the tower's time is not cut by pruning after it; and the LLM's FLOPs cut,
    # which bounds a compute-bound prefill (progressive strategies keep more tokens in their early layers).
    base8 = unpruned(8)
    for name in sorted(set(compiled["strategy"]) - {"none"}):
        rows = compiled[(compiled["strategy"] == name) & (compiled["budget"] == 64) & (compiled["batch"] == 8)]
        if base8 is not None and not rows.empty:
            pruned = rows.iloc[0]
            prefill = base8["llm_ms"] / pruned["llm_ms"]
            ratios = [f"TTFT {base8['ttft_ms'] / pruned['ttft_ms']:.2f}x"]
            if _get(base8, "llm_flops") and _get(pruned, "llm_flops"):
                ratios.append(f"LLM FLOPs cut {base8['llm_flops'] / pruned['llm_flops']:.2f}x")
            checks.append((f"{name} at 64 tokens, batch 8: LLM prefill throughput >= 4x",
                           f"{prefill:.2f}x ({'; '.join(ratios)})", bool(prefill >= 4.0)))
    return checks


def markdown(results: dict) -> str:
    """The results as a page: provenance, targets, and per batch a table of every strategy and budget."""
    from tabulate import tabulate

    table = frame(results)
    peaks = results.get("peaks") or {}
    clock = next((c["clock"] for c in results["cells"] if "clock" in c), "CUDA events")
    fusion = next((c["cell"].get("fusion") for c in results["cells"] if c["cell"]["mode"] == "compiled"), None)
    # Cells made before the selections were fused (git 1a76c3f and a9b821f) do not list their fused parts.
    parts = {tuple(c.get("fused", UNLISTED_FUSED_PARTS)) for c in results["cells"] if c["cell"]["mode"] == "compiled"}
    if not fusion:
        fused = ", the modules' own forwards (no fusion)"
    elif len(parts) == 1:
        *most, last = next(iter(parts))
        fused = f", its {', '.join(most)} and {last} through torch.compile ({fusion})"
    else:
        fused = f", through torch.compile ({fusion}), each cell what its `fused` lists (they differ)"
    packed = [c for c in results["cells"] if c.get("packed_projection_groups")]
    if packed:
        every = len(packed) == sum(c["cell"]["mode"] == "compiled" for c in results["cells"])
        fused += (", q/k/v and gate/up projections multiplied as one matrix each" +
                  ("" if every else " (in the cells listing `packed_projection_groups`)"))
    patched = [c for c in results["cells"] if c.get("patch_embeddings_as_matmul")]
    if patched:
        every = len(patched) == sum(c["cell"]["mode"] == "compiled" for c in results["cells"])
        fused += (", the patch embedding as one matrix multiplication" +
                  ("" if every else " (in the cells listing `patch_embeddings_as_matmul`)"))
    lines = [
        f"# Latency: {results['arch']} on {results['device']}",
        "",
        f"{results['description']}; random {results['dtype']} weights built from the config on the device, SDPA attention.",
        "",
        "- runs (each cell names its git SHA and, since they recorded it, its command):",
        *_runs(results),
        f"- last run: `{results['command']}` at git `{results['git_sha']}`; versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
    ]
    if peaks:
        lines.append(f"- this GPU, measured: {peaks['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 matmul, "
                     f"{peaks['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s ({peaks['how']})")
    lines += [
        f"- TTFT: vision tower + projector, selection, LLM prefill writing its KV cache, first token; {clock}, "
        "medians over the repetitions after 3 warm-up runs. `compiled`: the segmented prefill (on a GPU CUDA "
        f"graphs, timed by events inside them) over the model's own modules{fused}; `eager`: transformers' forward under the hook engine.",
        "- selection: every pruning step (scoring, selecting, gathering); decode: eager generate(), per token after "
        "the first; floor: max(FLOPs / peak, weight bytes / bandwidth) for the vision tower plus the same for the LLM.",
    ]
    skipped = {c.get("skipped_vision_blocks", 0) for c in results["cells"] if c["cell"]["mode"] == "compiled"}
    if skipped - {0}:
        lines.append(f"- `compiled` skips the last {'/'.join(map(str, sorted(skipped)))} vision block(s), whose output the "
                     "model never reads, and counts neither their FLOPs nor their weights; `eager` runs and counts them.")
    lines.append("")
    checks = targets(results)
    if checks:
        lines += ["## Targets", "", tabulate([(t, m, "met" if ok else "NOT met") for t, m, ok in checks],
                                             headers=["target", "measured", ""], tablefmt="github"), ""]
    for batch, rows in table.groupby("batch"):
        lines += [f"## Batch {batch}", ""]
        eager = rows[rows["mode"] == "eager"].set_index(["strategy", "budget"])
        compiled = rows[rows["mode"] == "compiled"].set_index(["strategy", "budget"])
        unpruned = compiled[compiled.index.get_level_values("strategy") == "none"]["ttft_ms"]
        base = unpruned.iloc[0] if len(unpruned) else None
        body = []
        keys = sorted(set(eager.index) | set(compiled.index), key=lambda k: (k[0] != "none", k[0], -k[1]))
        for key in keys:
            e = eager.loc[key] if key in eager.index else None
            c = compiled.loc[key] if key in compiled.index else None
            ttft, share = _get(c, "ttft_ms"), _get(c, "selection_share")
            body.append([
                key[0], key[1], _number(_get(e, "ttft_ms")), _number(ttft),
                _times(base / ttft if base and ttft else None),
                _number(_get(c, "selection_ms"), 3) + ("" if share is None else f" ({share:.1%})"),
                _number(_get(c, "vision_ms")), _number(_get(c, "llm_ms")), _number(_get(e, "decode_ms_per_token")),
                _number(_get(e, "peak_memory_gib"), 1) + " / " + _number(_get(c, "peak_memory_gib"), 1),
                _number(_get(c if c is not None else e, "tflops"), 2),
                _number(_get(c, "floor_ms")), _times(_get(c, "ttft_over_floor")),
                _get(c, "eager_segments") or "",
            ])
        headers = ["strategy", "budget", "TTFT eager ms", "TTFT compiled ms", "speedup", "selection ms (share)",
                   "vision ms", "LLM ms", "decode ms/token", "peak GiB eager / compiled", "TFLOPs", "floor ms", "TTFT / floor",
                   "segments run eagerly"]
        lines += [tabulate(body, headers=headers, tablefmt="github"), ""]
    errors = table[table["error"] != ""]
    for _, row in errors.iterrows():
        lines.append(f"- {row['strategy']} at {row['budget']}, batch {row['batch']}, {row['mode']}: {row['error']}")
    return "\n".join(lines) + "\n"


def cell_line(cell, measured: dict) -> str:
    """What `pruning-zoo bench latency` prints once a cell is measured: its TTFT and selection, or its error."""
    text = measured.get("error") or (f"TTFT {measured['ttft_ms']:.2f} ms, selection {measured['selection_ms']:.3f} ms"
                                    + (f", {measured['ttft_over_floor']:.2f}x floor" if "ttft_over_floor" in measured else ""))
    return f"{cell.mode:8} batch {cell.batch} {cell.strategy:11} {cell.budget:4}: {text} ({measured['seconds']:.1f} s)"


__all__ = ["cell_line", "frame", "markdown", "targets"]
