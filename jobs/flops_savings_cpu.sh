#!/usr/bin/env bash
# The flops-savings experiment at a CPU scale, data included, on this 2-core machine: 40,000
# generated captioned pictures (+300 held out) and seven of the embedded plays (Twelfth Night held
# out), tokenized with the demo's BPE and VQ tokenizers (made by `moma demo` when absent), then
# `moma experiment flops-savings`. The held-out set is weighted like training (85 % captions, 15 %
# plays, shares of tokens). Rerun the same line to resume; the data is built once for every OUT.
#
#   bash jobs/flops_savings_cpu.sh [OUT] [experiment flags...]     # default runs/flops_cpu, --scale cpu
#   bash jobs/flops_savings_cpu.sh runs/ablation_swin --model-set block_norm=swin \
#       --variants moma_4t4i,moma_4t4i+router_rank=softmax --dense-budgets 0.5,1,2
#   bash jobs/flops_savings_cpu.sh runs/flops_cpu_long --scale cpu-long --variants moe_8x,moma_4t4i
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/flops_cpu}
shift || true
data=${MOMA_FLOPS_DATA:-runs/flops_data}
moma=${MOMA:-.venv/bin/moma}
tok=runs/demo/tokenizers
[ -f $tok/image/image_tokenizer.json ] || $moma demo --out runs/demo --steps 20
.venv/bin/python - "$data" <<'PY'
import sys
from pathlib import Path

from moma.pipeline.synthetic import write_folder_corpus

d = Path(sys.argv[1])
for name, count, seed in (("shapes", 40000, 7), ("heldout", 300, 54321)):
    if not (d / name / "README.json").exists():
        write_folder_corpus(d / name, count, seed=seed, size=64)
PY
plays=pipeline/assets/text
build() {  # NAME SOURCE... : one shard set, skipped when finished
    local name=$1; shift
    local sources=()
    for s in "$@"; do sources+=(--source "$s"); done
    [ -f "$data/shards/$name/manifest.json" ] || $moma shards build "${sources[@]}" --order random \
        --text-tokenizer $tok/text --image-tokenizer $tok/image --out "$data/shards/$name" --workers 2 \
        --num-partitions 4
}
build captions "folder:$data/shapes"
build text $(for p in hamlet julius_caesar lear macbeth midsummer_nights_dream romeo_and_juliet tempest; do
    echo "text:$plays/$p.txt"; done)
build heldout_captions "folder:$data/heldout"
build heldout_text "text:$plays/twelfth_night.txt"
scale=(--scale cpu)
case " $* " in *" --scale "*) scale=() ;; esac
$moma experiment flops-savings --data "$data/shards/captions@0.85" "$data/shards/text@0.15" \
    --eval-data "$data/shards/heldout_captions@0.85" "$data/shards/heldout_text@0.15" \
    --text-tokenizer $tok/text --image-tokenizer $tok/image "${scale[@]}" --out "$out" "$@"
