#!/usr/bin/env bash
# The testbed suite on a lent GPU, in one call: install the wheels carried in .wheels/ (lmms-eval and the
# packages the device image lacks: scripts/device-wheels.txt), run `pruning-zoo run --suite testbed` on CUDA, build
# its leaderboard, and pack both into $OUT/testbed-gpu.tgz (the device returns few files).
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> bash scripts/device_run_testbed.sh [extra run options]
set -euo pipefail
python3 -m pip install -q --no-deps .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1   # no network there: fail at once instead of retrying
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT/work"
pruning-zoo run --suite testbed --device cuda --output "$OUT/work/results" "$@" || echo "run exited with $?"
pruning-zoo leaderboard "$OUT/work/results" -o "$OUT/work/leaderboard"
tar czf "$OUT/testbed-gpu.tgz" -C "$OUT/work" results leaderboard
rm -rf "$OUT/work"
