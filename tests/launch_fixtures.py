"""Run test workers for real: 2 gloo ranks under the deepspeed launcher, or one plain process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float, log: Path | None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


def run_deepspeed(args: list[str], nprocs: int = 2, timeout: float = 600, log: Path | None = None,
                  **env: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N ...` on CPU: N real gloo ranks (DeepSpeed's runner and launch.py, through
    pipeline/launch.py: a signal checkpoints and stops the job)."""
    cmd = [sys.executable, "-m", "moma.pipeline.launch", "--num_gpus", str(nprocs), "--master_port", str(free_port()),
           *args]
    return _run(cmd, cpu_env(**env), timeout, log)


def run_single(args: list[str], timeout: float = 600, log: Path | None = None,
               **env: str) -> subprocess.CompletedProcess:
    """One process with a world of size 1 (what torchrun --nproc_per_node 1 would export)."""
    extra = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    extra.update(env)
    return _run([sys.executable, *args], cpu_env(**extra), timeout, log)
