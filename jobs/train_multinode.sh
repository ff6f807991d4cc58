#!/usr/bin/env bash
# Train on several nodes with the deepspeed launcher and a hostfile (passwordless ssh between nodes,
# the same checkout and .venv path on every node, shards on a shared filesystem).
#
#   bash jobs/train_multinode.sh HOSTFILE CONFIG.yaml [KEY=VALUE ...]
#
# HOSTFILE lines look like "node01 slots=8". The config is checked for the total slot count first.
set -euo pipefail
hostfile=${1:?usage: train_multinode.sh HOSTFILE CONFIG [KEY=VALUE ...]}
config=${2:?usage: train_multinode.sh HOSTFILE CONFIG [KEY=VALUE ...]}
shift 2
bin=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
world=$(awk '/slots=/{split($2, a, "="); s += a[2]} END {print s}' "$hostfile")
master=$(awk 'NF {print $1; exit}' "$hostfile")
"$bin/python" -m moma.pipeline.cli train "$config" "$@" --check --world-size "$world"
exec "$bin/deepspeed" --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
    --module moma.pipeline.cli train "$config" "$@" --resume auto
