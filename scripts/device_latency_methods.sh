#!/usr/bin/env bash
# Issue 27's GPU cells in one call, each architecture measured afresh with its own unpruned baseline (no committed
# cells continued): the new strategies on LLaVA-1.5-7B, and ToMe inside the vision tower (its default constant
# schedule and the decreasing one, inflection=-1) on Qwen2-VL-7B and LLaVA-1.5-7B, compiled prefill, 64 tokens.
# Usage on the device: PRUNING_ZOO_GIT_SHA=<commit> bash scripts/device_latency_methods.sh
set -uo pipefail
python3 -m pip install -q --no-deps "${WHEELS:-.wheels}"/*.whl  # WHEELS=.wheels-bench: those of scripts/device-wheels.txt less lmms-eval and datasets
python3 -m pip install -q --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
out="$OUT/latency-methods"
mkdir -p "$out"
bench() {  # ARCH SECONDS [options]: one bench run, its output kept in ARCH.log, cut off after SECONDS
  local arch=$1 seconds=$2; shift 2
  timeout "$seconds" pruning-zoo bench latency --arch "$arch" --out "$out" --budgets 64 --modes compiled \
    --decode-tokens 0 --repeats 20 "$@" > >(tee -a "$out/$arch.log") 2>&1 || echo "bench $arch exited with $?"
}
# About 10 minutes of device time: LLaVA's new strategies first (a failed ToMe capture cannot cost them), then ToMe.
bench llava-1.5-7b 200 --batch 1,8 --strategies none,dart,pyramiddrop,sparsevlm,vispruner,prumerge_plus,cdpruner,holov
bench qwen2-vl-7b 150 --batch 1,8 --strategies none,visionzip,tome
bench qwen2-vl-7b 60 --batch 1 --strategies tome --param tome.inflection=-1
bench llava-1.5-7b 90 --batch 1,8 --strategies tome
bench llava-1.5-7b 40 --batch 1 --strategies tome --param tome.inflection=-1
ls -la "$out"
