"""Launching `moma train` under the deepspeed launcher from Python (the demo, the experiments)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launcher_env() -> dict[str, str]:
    """The environment for a launch: on a machine without GPUs, DeepSpeed's CPU accelerator with one
    thread per rank (2 ranks on 2 cores)."""
    env = dict(os.environ)
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(ranks: int, *args: str, master_port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS [--master_port P] --module moma.pipeline.cli ARGS...`, with the
    launcher installed beside this Python when there is one."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(ranks)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return [*cmd, "--module", "moma.pipeline.cli", *args]
