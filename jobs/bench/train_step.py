"""Benchmark: the whole training step (forward, backward, ZeRO-2 step, loader) in tokens/s for dense,
moe_8x, moma_1t1i and moma_4t4i, side by side, beside the paper's Table 2 (throughput vs dense:
1t1i -6 %, 8x -9 %, 4t4i -17 %).

    .venv/bin/python jobs/bench/train_step.py --data runs/demo [--presets tiny,90m] [--steps 8]

Each variant runs `moma train` under the deepspeed launcher on 2 ranks (CPU: gloo, fp32; expert
parallel 2 for the learned-routing variants, 1 otherwise), the same data, seq_len and batch; the
figure is the median tokens/s of the steps after the first two (metrics.jsonl). --data: a `moma
demo --out` directory (its tokenizers and shards). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

VARIANTS = ("dense", "moe_8x", "moma_1t1i", "moma_4t4i")
PAPER_VS_DENSE = {"moe_8x": -0.09, "moma_1t1i": -0.06, "moma_4t4i": -0.17}


def tokens_per_s(preset: str, ffn: str, data: Path, steps: int, micro: int, out: Path) -> float:
    learned = ffn not in ("dense", "moma_1t1i")
    cfg = {
        "run_dir": str(out / f"{preset}_{ffn}"), "max_steps": steps,
        "data": {"sources": [{"path": str(data / "shards" / "captions"), "weight": 0.85},
                             {"path": str(data / "shards" / "text"), "weight": 0.15}],
                 "seq_len": 256, "num_workers": 1},
        "tokenizers": {"text": str(data / "tokenizers" / "text"), "image": str(data / "tokenizers" / "image")},
        "model": {"preset": preset, "ffn": ffn},
        "schedule": {"warmup_steps": 1},
        "parallel": {"ds_config": "zero2_fp32", "ep_size": 2 if learned else 1, "micro_batch": micro,
                     "grad_accum": 1},
        "checkpoint": {"every": 10 ** 6, "universal": "never"},
    }
    path = out / f"{preset}_{ffn}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(launcher), "--num_gpus", "2", "--module", "moma.pipeline.cli", "train", str(path)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / f"{preset}_{ffn}" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r.get("step", 0) > 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `moma demo --out` directory")
    ap.add_argument("--presets", default="tiny,90m")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    row: dict[str, object] = {"bench": "train_step", "ranks": 2, "seq_len": 256, "paper_vs_dense": PAPER_VS_DENSE}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            micro = 8 if preset == "tiny" else 2
            tps = {ffn: tokens_per_s(preset, ffn, Path(args.data), args.steps, micro, Path(tmp)) for ffn in VARIANTS}
            row[preset] = {"micro_batch": micro, **{f"{k}_tokens_per_s": round(v) for k, v in tps.items()},
                           **{f"{k}_vs_dense": round(v / tps["dense"] - 1, 3) for k, v in tps.items() if k != "dense"}}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
