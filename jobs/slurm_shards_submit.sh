#!/usr/bin/env bash
# Submit a shard build as a SLURM array (one task per partition) plus the merge that runs when
# every task succeeded (numbering the tars, writing rejects.jsonl, sizes.json, manifest.json).
#
#   bash jobs/slurm_shards_submit.sh 64 /data/shards/coco --source coco:/data/coco/captions_train2017.json \
#       --text-tokenizer tok/text --image-tokenizer tok/vq
set -euo pipefail
partitions=${1:?usage: slurm_shards_submit.sh NUM_PARTITIONS OUT_DIR BUILD_ARGS...}
out=${2:?usage: slurm_shards_submit.sh NUM_PARTITIONS OUT_DIR BUILD_ARGS...}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
array=$(sbatch --parsable --array=0-$((partitions - 1)) "$here/slurm_shards.sbatch" "$partitions" "$out" "$@")
merge=$(sbatch --parsable --dependency=afterok:"$array" --job-name=moma-shards-merge --ntasks=1 \
    --wrap "$here/../.venv/bin/python -m moma.pipeline.cli shards merge $out")
echo "submitted partitions as job $array, merge as job $merge"
