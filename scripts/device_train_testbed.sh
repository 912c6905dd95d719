#!/usr/bin/env bash
# The testbed's reference model from scratch on a lent GPU, one schedule split over calls that each fit the
# device's 10-minute limit: every call runs the same `pruning-zoo testbed train` command for at most
# SECONDS_PER_CALL seconds, the first from scratch and the later ones with --resume from the checkpoint the
# previous call left in DIR (so the calls must follow each other while the machine is warm). The call that
# finishes packs the model into $OUT: its three weight shards as they are and everything else in model-files.tgz
# (the device returns at most 8 files, 16 MiB each).
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> [SECONDS_PER_CALL=530] bash scripts/device_train_testbed.sh DIR
set -euo pipefail
out=${1:?usage: device_train_testbed.sh DIR}
python3 -m pip install -q --no-deps .wheels/*.whl   # pydantic and the rest the image lacks (scripts/device-wheels.txt)
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
resume=()
[ -f "$out/checkpoint.pt" ] && resume=(--resume)
pruning-zoo testbed train --out "$out" --seed 0 --steps 10000 --learning-rate 8e-4 --extra-spatial 2 \
  --workers 15 --validate-every 500 --max-seconds "${SECONDS_PER_CALL:-530}" "${resume[@]}"
if [ -f "$out/training.json" ]; then
  cp "$out"/model-*.safetensors "$OUT/"
  tar czf "$OUT/model-files.tgz" -C "$out" --exclude='model-*.safetensors' .
fi
