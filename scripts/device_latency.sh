#!/usr/bin/env bash
# The latency benchmark on a lent GPU, in one call: install the project (no dependencies: the device image has
# torch and transformers), run `pruning-zoo bench latency` for each architecture given, and copy the results
# (JSON with every cell, and the markdown page) to $OUT.
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> bash scripts/device_latency.sh ARCH [ARCH...] -- [bench options]
# Give the commit as `git rev-parse HEAD` prints it where the tree was sent from: the device's git copy may
# name an older one.
# Committed results in leaderboard/latency/ are continued (finished cells skipped): remove an ARCH.json there
# to measure it afresh.
set -euo pipefail
python3 -m pip install -q --no-deps .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
archs=()
while [[ $# -gt 0 && "$1" != "--" ]]; do archs+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
mkdir -p "$OUT/latency"
cp -n leaderboard/latency/*.json "$OUT/latency/" 2>/dev/null || true   # continue committed results (not over an earlier call's, in one command)
for arch in "${archs[@]}"; do
  pruning-zoo bench latency --arch "$arch" --out "$OUT/latency" "$@" > >(tee -a "$OUT/latency/$arch.log") 2>&1 \
    || echo "bench $arch exited with $?"
done
