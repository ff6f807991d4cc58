#!/usr/bin/env bash
# The MoE issue's GPU checks on one GPU (an H200) that has torch but no network and none of our other
# dependencies: install the carried wheels (jobs/gpu/build_wheels.sh), then measure, in under 8 min:
#   * 90m and 435m presets, dense and moma_4t4i, bf16, seq 4096: tokens/s, MFU, peak memory
#     (jobs/gpu/gpu_check.py; model FLOPs per token from the accounting `moma model info` prints);
#   * the MoE-layer ratios of jobs/bench/moe_layer.py (moma_4t4i vs dense vs DeepSpeed top-1) in bf16.
#
#   bash jobs/gpu/gpu_check.sh            # prints JSON lines; also writes them to $OUT if set
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q --no-index --no-deps jobs/gpu/wheels/*.whl
# moma itself without an install: the package's two halves mapped as pyproject.toml maps them
pkg=$(mktemp -d)/site
mkdir -p "$pkg/moma"
for d in pipeline tokenizers ds_configs; do ln -s "$PWD/$d" "$pkg/moma/$d"; done
ln -s "$PWD/jobs/configs" "$pkg/moma/configs"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
log=${OUT:-/tmp}/gpu_check.jsonl
: > "$log"
timeout 300 python jobs/gpu/gpu_check.py --presets 90m,435m --seq-len 4096 | tee -a "$log"
timeout 150 python jobs/bench/moe_layer.py --device cuda --dtypes bf16 --tokens 32768 --d-model 1024 \
    --hidden 2560 --peak-tflops 989 | tee -a "$log"
