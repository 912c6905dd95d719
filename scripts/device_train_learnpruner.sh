#!/usr/bin/env bash
# LearnPruner's module for the testbed's reference model, on a lent GPU in one call: train one module at budget
# 64 and one at 32 into suites/testbed/, evaluate both on the test split through `pruning-zoo run`, and pack the
# modules and results into $OUT/learnpruner-gpu.tgz.
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> bash scripts/device_train_learnpruner.sh STEPS
set -euo pipefail
steps=${1:-2000}
python3 -m pip install -q --no-deps .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT/work"
for budget in 64 32; do
  pruning-zoo train learnpruner --model testbed --budget $budget --out suites/testbed/learnpruner-$budget \
    --steps "$steps" --batch-size 32 --workers 12 --validate-every 250 --device cuda --max-seconds 240
done
pruning-zoo run --suite testbed --strategies learnpruner --device cuda --output "$OUT/work/results" || true
pruning-zoo run --suite testbed --strategies learnpruner --param learnpruner.module=testbed/learnpruner-32 \
  --device cuda --output "$OUT/work/results" || true
tar czf "$OUT/learnpruner-gpu.tgz" suites/testbed/learnpruner-64 suites/testbed/learnpruner-32 -C "$OUT/work" results
rm -rf "$OUT/work"
