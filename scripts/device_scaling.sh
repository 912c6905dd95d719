#!/usr/bin/env bash
# Issue 9's measurement on a lent 2-GPU machine, in one call: the testbed suite on one GPU, then on two through
# torchrun (one process per GPU), each timed wall-clock from the command's start to its end; accuracy figures
# compared cell by cell. Writes $OUT/scaling.json, $OUT/one-gpu.tgz and $OUT/two-gpus.tgz (results and logs).
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> bash scripts/device_scaling.sh [extra run options]
set -euo pipefail
python3 -m pip install -q --no-deps .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
work="$OUT/work"; mkdir -p "$work"
# Both timed runs start warm, as on a machine that has run the tool before: bytecode compiled (the image's
# site-packages may be read-only, so into a cache of our own), kernels and the driver loaded, and torch.compile's
# caches (the compiled-latency timing fuses the layers and every strategy's selections) holding their graphs,
# static and dynamic. A short sweep of every strategy into a scratch folder does it.
export PYTHONPYCACHEPREFIX="$work/pycache"
python3 - <<'PY'
import os, transformers
folder = os.path.dirname(transformers.__file__)
print("transformers' folder writable:", os.access(folder, os.W_OK), "has bytecode:", os.path.isdir(os.path.join(folder, "__pycache__")))
PY
warm=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 pruning-zoo run --suite testbed --device cuda --output "$work/warm-up" --budgets 64 --limit 32 > "$work/warm.log" 2>&1
start=$(date +%s.%N)
echo "warm-up run: $(python3 -c "print(round($start - $warm, 1))") s"
CUDA_VISIBLE_DEVICES=0 pruning-zoo run --suite testbed --device cuda --output "$work/one-gpu" "$@" > "$work/one.log" 2>&1
middle=$(date +%s.%N)
tar czf "$OUT/one-gpu.tgz" -C "$work" one-gpu one.log  # back even if the two-GPU run is cut off
# torchrun would give each process OMP_NUM_THREADS=1; the one-GPU run had every core.
OMP_NUM_THREADS=$(( $(nproc) / 2 )) python3 -m torch.distributed.run --nproc_per_node 2 -m pruning_zoo.cli run --suite testbed --output "$work/two-gpus" "$@" \
  > "$work/two.log" 2>&1
end=$(date +%s.%N)
python3 - "$work" "$start" "$middle" "$end" > "$OUT/scaling.json" <<'PY'
import json, sys, pathlib
work, start, middle, end = pathlib.Path(sys.argv[1]), *map(float, sys.argv[2:])
def cells(folder):
    return sorted(path for path in (work / folder).iterdir() if path.is_dir())
def scores(folder):
    return {p.name: json.loads((p / "metrics.json").read_text())["scores"] for p in cells(folder)}
def cell_seconds(folder):
    """Sums over the cells of each step's seconds, and of each process's split of its evaluation."""
    configs = [json.loads((p / "config.json").read_text())["seconds"] for p in cells(folder)]
    steps = {name: round(sum(c.get(name) or 0 for c in configs), 2) for name in configs[0] if name != "processes"}
    processes = [{name: round(sum(c["processes"][rank][name] for c in configs), 2) for name in configs[0]["processes"][rank]}
                 for rank in range(len(configs[0]["processes"]))]
    return {**steps, "processes": processes}
one, two = scores("one-gpu"), scores("two-gpus")
one_seconds, two_seconds = cell_seconds("one-gpu"), cell_seconds("two-gpus")
print(json.dumps({"one_gpu_seconds": round(middle - start, 1), "two_gpu_seconds": round(end - middle, 1),
                  "speedup": round((middle - start) / (end - middle), 2), "cells": len(one),
                  "identical_scores": one == two,
                  "differences": {k: [one[k], two.get(k)] for k in one if one[k] != two.get(k)},
                  "cell_seconds": {"one_gpu": one_seconds, "two_gpus": two_seconds},
                  "startup_and_shutdown_seconds": {"one_gpu": round(middle - start - one_seconds["total"], 1),
                                                   "two_gpus": round(end - middle - two_seconds["total"], 1)}},
                 indent=1))
PY
cat "$OUT/scaling.json"
tail -n 5 "$work/one.log"; tail -n 5 "$work/two.log"
tar czf "$OUT/two-gpus.tgz" -C "$work" two-gpus two.log
rm -rf "$work"
