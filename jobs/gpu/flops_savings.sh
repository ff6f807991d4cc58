#!/usr/bin/env bash
# The flops-savings experiment (#16) at its gpu scale on one GPU (an H200, sized for <= 8 minutes):
# a 90m-class width (d 512, 4 layers), seq 1024, 16 sequences per step, 300 steps per variant, dense
# at 0.5/1/2/4x, one seed, fp32 ZeRO-2 on one rank (as the cpu scale, so the two tables compare).
# The GPU machine has torch but no network and none of our other dependencies.
#
# On the development machine:
#   bash jobs/gpu/build_wheels.sh                        # deepspeed + pure-Python deps -> jobs/gpu/wheels
#   .venv/bin/moma demo --out runs/demo --steps 2        # (once) the demo's tokenizers and shards
# then, through the device tool, carrying
#   jobs/gpu/wheels runs/demo/shards runs/demo/tokenizers/text
#   runs/demo/tokenizers/image/model.safetensors runs/demo/tokenizers/image/image_tokenizer.json
# run
#   bash jobs/gpu/flops_savings.sh                       # report.md/json + PNGs in $OUT (or /tmp)
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -q --no-index --no-deps jobs/gpu/wheels/*.whl
pkg=$(mktemp -d)/site  # moma without an install: the package's halves mapped as pyproject.toml maps them
mkdir -p "$pkg/moma"
for d in pipeline tokenizers ds_configs; do ln -s "$PWD/$d" "$pkg/moma/$d"; done
ln -s "$PWD/jobs/configs" "$pkg/moma/configs"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-/tmp}/flops_savings_gpu
timeout 470 python -m moma.pipeline.cli experiment flops-savings \
    --data runs/demo/shards/captions@0.85 runs/demo/shards/text@0.15 --eval-data runs/demo/shards/heldout \
    --text-tokenizer runs/demo/tokenizers/text --image-tokenizer runs/demo/tokenizers/image \
    --scale gpu --out "$out"
