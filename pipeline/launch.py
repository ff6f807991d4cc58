"""Launching `moma train` under the deepspeed launcher, with a stop policy that saves the run.

    python -m moma.pipeline.launch --num_gpus 2 --module moma.pipeline.cli train CONFIG --resume auto

takes exactly the `deepspeed` runner's arguments and runs DeepSpeed's own runner and node launcher
(launch.py) code, with one change: what they do on SIGTERM / SIGINT. Stock DeepSpeed, on a signal
to launch.py (or to the whole process group: `timeout`, `kill -- -PGID`, systemd, schedulers),
SIGTERMs each rank's whole tree at once (DataLoader workers included), SIGKILLs what is left after
30 s and exits 1; the runner has no handler on one node, so a signal to it alone ends only the
runner and leaves the ranks training on as orphans. Here:

    runner     forwards SIGTERM to its node launcher and waits for it: it exits with its code
    launcher   forwards SIGTERM to its ranks (only them) and waits: all exit 0 -> it exits 0
    rank       finishes the current step, checkpoints, exits 0 (training/stopping.py, which also
               makes DataLoader workers forward a signal to their rank instead of dying)

A rank that fails is still handled by DeepSpeed's own code (the others are terminated, the
launcher exits with the failing rank's code). To abort without a checkpoint: SIGKILL.
Test: tests/test_signals.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

NODE = "--moma-node-launcher"  # first argument of the node launcher this module starts
DS_NODE_MODULE = "deepspeed.launcher.launch"


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
    """`python -m moma.pipeline.launch --num_gpus RANKS [--master_port P] --module moma.pipeline.cli
    ARGS...`: the deepspeed runner with this module's stop policy."""
    cmd = [sys.executable, "-m", "moma.pipeline.launch", "--num_gpus", str(ranks)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return [*cmd, "--module", "moma.pipeline.cli", *args]


def _forward_to_children(role: str) -> Any:
    """A handler: SIGTERM to each direct child (runner: the node launcher; node launcher: the ranks),
    then go on waiting for them."""
    def handle(signum: int, frame: Any) -> None:
        import psutil

        children = psutil.Process().children()
        for child in children:
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        print(f"{role}: {signal.Signals(signum).name}: asked {len(children)} process(es) to checkpoint and stop; "
              f"waiting for them (SIGKILL to abort)", file=sys.stderr, flush=True)
    return handle


class _SignalShim:
    """DeepSpeed's launch.py, seen through this: its SIGINT/SIGTERM handlers are not installed (ours
    stay); everything else is the signal module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    @staticmethod
    def signal(signum: int, handler: Any) -> Any:
        if signum in (signal.SIGINT, signal.SIGTERM):
            return signal.getsignal(signum)
        return signal.signal(signum, handler)


class _SubprocessShim:
    """DeepSpeed's runner, seen through this: the node launcher it starts is this module's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(cmd: Any, *args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 (subprocess's name)
        if isinstance(cmd, list) and DS_NODE_MODULE in cmd:
            i = cmd.index(DS_NODE_MODULE)
            cmd = [*cmd[:i], __spec__.name if __spec__ else "moma.pipeline.launch", NODE, *cmd[i + 1:]]
        return subprocess.Popen(cmd, *args, **kwargs)


def _install(role: str) -> None:
    handler = _forward_to_children(role)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def node_main(args: list[str]) -> int:
    """DeepSpeed's launch.py main with the forwarding handlers (installed before its slow import)."""
    _install("launcher")
    from deepspeed.launcher import launch

    launch.signal = _SignalShim()  # its module global: its handlers are not installed, ours stay
    sys.argv = [launch.__file__, *args]
    launch.main()  # returns when every rank exited 0; sys.exit(code) when one failed
    return 0


def runner_main(args: list[str]) -> int:
    """DeepSpeed's runner main with the forwarding handlers, starting this module's node launcher."""
    _install("runner")
    from deepspeed.launcher import runner

    runner.subprocess = _SubprocessShim()
    runner.main(args)  # sys.exit(code) when the node launcher failed
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [NODE]:
        return node_main(argv[1:])
    return runner_main(argv)


if __name__ == "__main__":
    sys.exit(main())
