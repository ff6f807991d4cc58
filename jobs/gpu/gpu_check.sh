#!/usr/bin/env bash
# The GPU checks of issues #18/#21 on one GPU (an H200 whose image has Python 3.12, torch and numpy
# but no network): the carried wheels (jobs/gpu/build_wheels.sh) through jobs/gpu/env.sh, then
#   * gpu_check.py: 90m and 435m presets, dense and moma_4t4i, bf16, seq 4096, `moma train`'s path
#     (build_model, the zero1_bf16 DeepSpeed engine, one rank): tokens/s, MFU, peak memory vs the dry run;
#   * jobs/bench/moe_layer.py: the MoE-layer ratios (moma_4t4i vs dense vs DeepSpeed top-1), bf16;
#   * the bf16 model tests on CUDA (tests/test_bf16.py -k cuda).
#
# Budget (together with jobs/gpu/flops_savings.sh, one device run of <= 480 s; tests/test_gpu_recipe.py
# adds up the run_step limits and the setup allowance of both scripts):
# setup allowance: 20 s   (env.sh: pip's dry run + ~10 MB of wheels into a temp site; python imports)
#   gpu_check.py 150 s: imports + init ~15 s; builds ~40 s (the 1.75 B-parameter 435m moma_4t4i is
#     built on the GPU, its weights drawn on the CPU one tensor at a time); 4 x 11 steps of 8-16 k
#     tokens at >= 100 k tokens/s ~ 15 s; the dry run's activation measurement (1- and 2-layer models of each preset on the
#     CPU) ~20 s; i.e. ~90 s expected, the rest is margin
#   moe_layer.py 50 s: imports ~10 s, 4 layers x 17 rounds of 32 k tokens (~1 GFLOP-class each), seconds
#   pytest bf16 on CUDA 40 s: collection ~15 s, 11 small tests
#   sum 20 + 150 + 50 + 40 = 260 s; flops_savings.sh: 20 + 200 = 220 s; both 480 s
#
#   bash jobs/gpu/gpu_check.sh            # prints JSON lines; also writes them to $OUT (or /tmp)
set -uo pipefail
cd "$(dirname "$0")/../.."
source jobs/gpu/env.sh || exit 2
log=${OUT:-/tmp}/gpu_check.jsonl
: > "$log"
failed=0
run_step() {  # NAME SECONDS COMMAND...: run under its time limit, log everything, go on after a failure
    local name=$1 secs=$2
    shift 2
    echo "== $name (limit ${secs} s)"
    timeout "$secs" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "{\"step\": \"$name\", \"exit\": $rc}" | tee -a "$log"; failed=1; }
}
run_step gpu_check 150 python3 jobs/gpu/gpu_check.py --presets 90m,435m --seq-len 4096
run_step moe_layer 50 python3 jobs/bench/moe_layer.py --device cuda --dtypes bf16 --tokens 32768 --d-model 1024 \
    --hidden 2560 --peak-tflops 989 --repeat 15
run_step bf16_tests 40 python3 -m pytest -q -p no:cacheprovider tests/test_bf16.py -k cuda
exit $failed
