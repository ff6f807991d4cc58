#!/usr/bin/env bash
# The flops-savings experiment (#16) at its cpu scale, data included, on this 2-core machine (about
# 75 minutes): 40,000 generated captioned pictures (+300 held out) and seven of the embedded plays
# (Twelfth Night held out), tokenized with the demo's BPE and VQ tokenizers (made by `moma demo` when
# absent), then `moma experiment flops-savings --scale cpu`. Rerun the same line to resume.
#
#   bash jobs/flops_savings_cpu.sh [OUT]          # default runs/flops_cpu; report in OUT/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/flops_cpu}
data=$out/data
moma=.venv/bin/moma
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
$moma experiment flops-savings --data "$data/shards/captions@0.85" "$data/shards/text@0.15" \
    --eval-data "$data/shards/heldout_captions" "$data/shards/heldout_text" \
    --text-tokenizer $tok/text --image-tokenizer $tok/image --scale cpu --out "$out"
