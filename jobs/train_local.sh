#!/usr/bin/env bash
# Train on one node with the deepspeed launcher.
#
#   bash jobs/train_local.sh CONFIG.yaml [NUM_GPUS] [KEY=VALUE ...]
#
# On a machine without CUDA the ranks run on the CPU (DS_ACCELERATOR=cpu, gloo, one thread each):
#   bash jobs/train_local.sh jobs/configs/demo_tiny.yaml 2
# The config is checked first (a bad config stops here, before any process starts); the run resumes
# from its latest checkpoint if it has one. SIGTERM or SIGINT (Ctrl-C) to this script's process (it
# becomes the runner), to any process below it or to the whole process group: the current step
# finishes, the run checkpoints, every rank exits and then this exits 0 (pipeline/launch.py).
# MASTER_PORT: the rendezvous port (default DeepSpeed's 29500).
set -euo pipefail
config=${1:?usage: train_local.sh CONFIG [NUM_GPUS] [KEY=VALUE ...]}
shift
gpus=${1:-}
if [[ "$gpus" =~ ^[0-9]+$ ]]; then shift; else gpus=""; fi
bin=$(dirname "$0")/../.venv/bin
[ -x "$bin/python" ] || bin=$(dirname "$(command -v python3)")
if ! "$bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    gpus=${gpus:-2}
else
    gpus=${gpus:-$("$bin/python" -c "import torch; print(torch.cuda.device_count())")}
fi
"$bin/python" -m moma.pipeline.cli train "$config" "$@" --check --world-size "$gpus"
exec "$bin/python" -m moma.pipeline.launch --num_gpus "$gpus" ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
    --module moma.pipeline.cli train "$config" "$@" --resume auto
