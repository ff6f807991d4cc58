#!/usr/bin/env bash
# Submit a shard build as a SLURM array (one task per partition) plus the merge that runs when
# every task succeeded (numbering the tars, writing rejects.jsonl, sizes.json, manifest.json).
#
#   bash jobs/slurm_shards_submit.sh 64 /data/shards/coco --source coco:/data/coco/captions_train2017.json \
#       --text-tokenizer tok/text --image-tokenizer tok/vq
#   MOMA_SBATCH_ARGS="--partition=cpu --cpus-per-task=4" bash jobs/slurm_shards_submit.sh ...  # sbatch options
#
# A task that fails (or is cancelled) leaves the merge unrunnable: SLURM drops it; submit the same
# line again: finished partitions are skipped, the others are redone from scratch, and the merged
# shards are byte for byte those of a local build (tests/test_cluster_slurm.py, a real SLURM).
set -euo pipefail
partitions=${1:?usage: slurm_shards_submit.sh NUM_PARTITIONS OUT_DIR BUILD_ARGS...}
out=${2:?usage: slurm_shards_submit.sh NUM_PARTITIONS OUT_DIR BUILD_ARGS...}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
# the jobs run copies of the scripts: tell them where the checkout (and its .venv) is
export MOMA_REPO=${MOMA_REPO:-$(cd "$here/.." && pwd)}
parent=$(cd "$(dirname "$out")" 2>/dev/null && pwd) \
    || { echo "slurm_shards_submit.sh: the parent directory of $out does not exist" >&2; exit 2; }
out=$parent/$(basename "$out")  # absolute: the jobs may start elsewhere
read -r -a extra <<< "${MOMA_SBATCH_ARGS:-}"
array=$(sbatch --parsable "${extra[@]}" --array=0-$((partitions - 1)) "$here/slurm_shards.sbatch" \
    "$partitions" "$out" "$@")
array=${array%%;*}  # --parsable prints "ID[;CLUSTER]"
merge=$(sbatch --parsable "${extra[@]}" --dependency=afterok:"$array" --kill-on-invalid-dep=yes \
    --job-name=moma-shards-merge --ntasks=1 --output="slurm-%x-%j.out" \
    --wrap "$(printf '%q ' "$MOMA_REPO/.venv/bin/python" -m moma.pipeline.cli shards merge "$out")")
merge=${merge%%;*}
echo "submitted partitions as job $array, merge as job $merge"
