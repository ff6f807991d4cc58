"""Benchmark: checkpoint bytes and save time per save, for the tiny and 90m presets (moma_4t4i),
trained by `moma train` under the deepspeed launcher on 2 ranks (CPU: gloo, ZeRO-2, ep 2, fp32).

    .venv/bin/python jobs/bench/checkpoint.py --data runs/demo [--presets tiny,90m] [--steps 3]

Each preset trains --steps steps with a checkpoint after every step (keep all); a save's bytes are
its directory's, its time runs from its first file to its `complete` marker (file times, so the same
measurement works for any checkout: run another one's with PYTHONPATH, see jobs/bench/loader.py).
The last save of a launch is the `final` one (it carries the universal copy by default). --data: a
`moma demo --out` directory (its tokenizers and shards). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def measure(directory: Path) -> dict[str, float]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    times = [p.stat().st_mtime for p in files]
    return {"mb": round(sum(p.stat().st_size for p in files) / 1e6, 1), "seconds": round(max(times) - min(times), 2),
            "universal": (directory / "universal").exists()}


def run(preset: str, data: Path, steps: int, out: Path) -> dict[str, object]:
    cfg = {
        "run_dir": str(out / preset), "max_steps": steps,
        "data": {"sources": [{"path": str(data / "shards" / "captions"), "weight": 0.85},
                             {"path": str(data / "shards" / "text"), "weight": 0.15}],
                 "seq_len": 128, "num_workers": 1},
        "tokenizers": {"text": str(data / "tokenizers" / "text"), "image": str(data / "tokenizers" / "image")},
        "model": {"preset": preset, "ffn": "moma_4t4i"},
        "schedule": {"warmup_steps": 1},
        "parallel": {"ds_config": "zero2_fp32", "ep_size": 2, "micro_batch": 1, "grad_accum": 1},
        "checkpoint": {"every": 1, "keep": 0},
    }
    path = out / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([str(launcher), "--num_gpus", "2", "--module", "moma.pipeline.cli", "train", str(path)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    ckpt = out / preset / "checkpoints"
    saves = sorted((d for d in ckpt.glob("global_step*") if d.is_dir()), key=lambda d: (d / "complete").stat().st_mtime)
    rows = [{"tag": d.name, **measure(d)} for d in saves]
    periodic = [r for r in rows[:-1]] or rows
    return {"saves": rows, "wall_s": round(wall, 1),
            "periodic_save_mb": periodic[0]["mb"], "periodic_save_s": periodic[0]["seconds"],
            "final_save_mb": rows[-1]["mb"], "final_save_s": rows[-1]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `moma demo --out` directory")
    ap.add_argument("--presets", default="tiny,90m")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for preset in args.presets.split(","):
            results[preset] = run(preset, Path(args.data), args.steps, Path(tmp))
    print(json.dumps({"bench": "checkpoint", "steps": args.steps, **results}))


if __name__ == "__main__":
    main()
