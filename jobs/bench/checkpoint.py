"""Benchmark: checkpoint bytes and save time per save, for the tiny and 90m presets (moma_4t4i),
trained by `moma train` under the deepspeed launcher on 2 ranks (CPU: gloo, ZeRO-2, ep 2, fp32).

    .venv/bin/python jobs/bench/checkpoint.py --data runs/demo [--presets tiny,90m] [--steps 3]

Each preset trains --steps steps with a checkpoint after every step (keep all); a save's bytes are
its directory's, its time runs from its first file to its `complete` marker (file times, so the same
measurement works for any checkout: run another one's with PYTHONPATH, see jobs/bench/loader.py).
The last save of a launch is the `final` one (it carries the universal copy by default). --data: a
`moma demo --out` directory (its tokenizers and shards). Prints one JSON line.

Integrity cost: every save records each file's CRC-32 in `complete` (each rank hashes a share,
from the page cache) and every resume checks them. `checksum_s` / `verify_s`: one process hashing
all of a save's files (what a save costs its ranks together; each rank does ~1/world of it) and
checking them against `complete` (a resume; `verify_cold_s` after dropping the files from the page
cache where the OS allows, i.e. from disk), with `checksum_gb_s` the throughput.
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

from moma.pipeline.launch import free_port


def measure(directory: Path) -> dict[str, float]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    times = [p.stat().st_mtime for p in files]
    return {"mb": round(sum(p.stat().st_size for p in files) / 1e6, 1), "seconds": round(max(times) - min(times), 2),
            "universal": (directory / "universal").exists()}


def integrity_cost(directory: Path) -> dict[str, float]:
    """Seconds to checksum every file of a save (one process) and to verify them against `complete`."""
    from moma.pipeline.training.checkpoint import file_checksums, verify_files

    start = time.perf_counter()
    sums = file_checksums(directory)
    checksum_s = time.perf_counter() - start
    start = time.perf_counter()
    assert verify_files(directory) == []
    verify_s = time.perf_counter() - start
    cold = None
    for path in directory.rglob("*"):  # drop the files from the page cache (POSIX_FADV_DONTNEED)
        if path.is_file() and hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                cold = True
            finally:
                os.close(fd)
    if cold:
        start = time.perf_counter()
        verify_files(directory)
        cold = round(time.perf_counter() - start, 3)
    gb = sum(v[0] for v in sums.values()) / 1e9
    return {"checksum_s": round(checksum_s, 3), "verify_s": round(verify_s, 3), "verify_cold_s": cold,
            "checksum_gb_s": round(gb / max(checksum_s, 1e-9), 2)}


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
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moma.pipeline.launch", "--num_gpus", "2", "--master_port", str(free_port()),
                    "--module", "moma.pipeline.cli", "train", str(path)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    ckpt = out / preset / "checkpoints"
    saves = sorted((d for d in ckpt.glob("global_step*") if d.is_dir()), key=lambda d: (d / "complete").stat().st_mtime)
    rows = [{"tag": d.name, **measure(d), **integrity_cost(d)} for d in saves]
    periodic = [r for r in rows[:-1]] or rows
    return {"saves": rows, "wall_s": round(wall, 1),
            "periodic_save_mb": periodic[0]["mb"], "periodic_save_s": periodic[0]["seconds"],
            "final_save_mb": rows[-1]["mb"], "final_save_s": rows[-1]["seconds"],
            "periodic_checksum_s": periodic[0]["checksum_s"], "final_checksum_s": rows[-1]["checksum_s"],
            "final_verify_s": rows[-1]["verify_s"], "final_verify_cold_s": rows[-1]["verify_cold_s"]}


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
