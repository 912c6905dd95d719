#!/usr/bin/env bash
# The positions ablation (suites/testbed-keep-positions.yaml) on a lent GPU in one call: the suite as it is, then
# LearnPruner with each trained module under suites/testbed/learnpruner-*; results packed into $OUT/ablation-gpu.tgz.
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> bash scripts/device_positions_ablation.sh
set -euo pipefail
python3 -m pip install -q --no-deps .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT/work"
pruning-zoo run --suite testbed-keep-positions --device cuda --output "$OUT/work/results" || true
for module in suites/testbed/learnpruner-*/; do
  pruning-zoo run --suite testbed-keep-positions --strategies learnpruner --device cuda --output "$OUT/work/results" \
    --param learnpruner.module=testbed/$(basename "$module") || true
done
tar czf "$OUT/ablation-gpu.tgz" -C "$OUT/work" results
rm -rf "$OUT/work"
