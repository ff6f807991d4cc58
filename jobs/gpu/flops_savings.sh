#!/usr/bin/env bash
# The flops-savings experiment (#16) at its gpu scale on one GPU (an H200 whose image has Python 3.12,
# torch and numpy but no network): pipeline/experiments/flops_savings.py's "gpu" scale — a 90m-class
# width (d 512, 4 layers), seq 1024, 16 sequences (16,384 tokens) per step, 200 steps per variant,
# bf16 (zero2_bf16: fp32 accumulation), routing statistics on logged steps only (every 25th) —
# dense at 0.5/1/2x and moma_4t4i at 1x: 4 launches, 4.5 x 200 = 900 steps.
#
# Budget (with jobs/gpu/gpu_check.sh, one device run of <= 480 s; tests/test_gpu_recipe.py adds it up):
# setup allowance: 20 s   (env.sh)
#   experiment 200 s: 4 launches x ~25 s (launcher + rank imports, engine, loader worker, held-out
#     evaluation of 16 batches, final checkpoint) = 100 s; 900 steps x ~0.09 s (a 4-layer d-512 step of
#     16 k tokens is ~1.6 TFLOP, ~5 ms of tensor-core time: the step is bound by DeepSpeed, the MoE
#     dispatch's small kernels and the loader) = 81 s; 181 s expected. Each finished run keeps its
#     result.json: a rerun (same --out) skips them.
#
# On the development machine:
#   bash jobs/gpu/build_wheels.sh                        # the wheels the image lacks -> jobs/gpu/wheels
#   .venv/bin/moma demo --out runs/demo --steps 2        # (once) the demo's tokenizers and shards
# then, through the device tool, carrying
#   jobs/gpu/wheels runs/demo/shards runs/demo/tokenizers/text
#   runs/demo/tokenizers/image/model.safetensors runs/demo/tokenizers/image/image_tokenizer.json
# run
#   bash jobs/gpu/gpu_check.sh; bash jobs/gpu/flops_savings.sh    # report.md/json + PNGs in $OUT (or /tmp)
set -uo pipefail
cd "$(dirname "$0")/../.."
source jobs/gpu/env.sh || exit 2
out=${OUT:-/tmp}/flops_savings_gpu
failed=0
run_step() {  # NAME SECONDS COMMAND...: run under its time limit; a failure is reported, not hidden
    local name=$1 secs=$2
    shift 2
    echo "== $name (limit ${secs} s)"
    timeout "$secs" "$@"
    local rc=$?
    [ "$rc" = 0 ] || { echo "{\"step\": \"$name\", \"exit\": $rc}"; failed=1; }
}
run_step flops_savings 200 python3 -m moma.pipeline.cli experiment flops-savings \
    --data runs/demo/shards/captions@0.85 runs/demo/shards/text@0.15 --eval-data runs/demo/shards/heldout \
    --text-tokenizer runs/demo/tokenizers/text --image-tokenizer runs/demo/tokenizers/image \
    --scale gpu --variants moma_4t4i --out "$out"
exit $failed
