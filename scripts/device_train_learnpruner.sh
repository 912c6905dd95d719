#!/usr/bin/env bash
# LearnPruner's module for the testbed's reference model, on a lent GPU in one call: train a module at budget 64
# with each training selection (--train-keep stage1 and budget) into suites/testbed/, evaluate each at 64 and 32
# tokens on the test split through `pruning-zoo run`, and pack modules and results into $OUT/learnpruner-gpu.tgz.
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> [BUDGET=64] [KEEPS="stage1 budget"] [SECONDS_PER_RUN=200] [POSITIONS=keep] \
#   bash scripts/device_train_learnpruner.sh STEPS
set -euo pipefail
steps=${1:-1500}
python3 -m pip install -q --no-deps .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT/work"
for keep in ${KEEPS:-stage1 budget}; do
  pruning-zoo train learnpruner --model testbed --budget ${BUDGET:-64} --train-keep $keep --out suites/testbed/learnpruner-${BUDGET:-64}-$keep \
    --steps "$steps" --batch-size 32 --workers 12 --validate-every 500 --device cuda --max-seconds ${SECONDS_PER_RUN:-200} ${POSITIONS:+--positions $POSITIONS}
  pruning-zoo run --suite testbed --strategies learnpruner --param learnpruner.module=testbed/learnpruner-${BUDGET:-64}-$keep \
    --device cuda --output "$OUT/work/results" || true
done
tar czf "$OUT/learnpruner-gpu.tgz" suites/testbed/learnpruner-${BUDGET:-64}-* -C "$OUT/work" results
rm -rf "$OUT/work"
