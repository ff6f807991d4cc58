"""A stop request: what a rank and its DataLoader workers do with SIGTERM, SIGINT and SIGUSR1.

    rank     the handler only sets a flag; the ranks agree on it once per step (train._loop), then
             checkpoint and exit 0 (a requeued job resumes with --resume auto)
    worker   (forked by its rank) the stop signals are blocked, and a thread forwards each one to the
             rank: the worker goes on serving batches until its rank, done saving, shuts it down
    watch    a rank started by DeepSpeed's launch.py also stops (checkpointed) when the process that
             started that launcher, the `deepspeed` runner, goes away: a killed runner leaves no
             orphan ranks training on (and colliding with the job's restart)

The launchers' side (forward to the ranks, wait for them, exit 0) is pipeline/launch.py. Why the
workers block rather than ignore: torch's worker loop installs its own SIGTERM handler (die unless
the parent sent it) after any handler inherited at fork, so a signal to the whole process group
(`timeout`, `kill -- -PGID`, systemd, schedulers) killed the workers and, with them, the rank's
step: "DataLoader worker (pid ...) is killed by signal: Terminated". A blocked signal never reaches
that handler. Test: tests/test_signals.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
LAUNCHERS = ("deepspeed.launcher.launch", "moma.pipeline.launch")
_workers_forward = False


class StopRequest:
    """Set by a stop signal (or the runner's death); read by the training loop once per step."""

    def __init__(self) -> None:
        self.requested = False
        self.reason: str | None = None

    def install(self, watch_launcher: bool = True) -> StopRequest:
        """Handlers in this (the main) thread; workers forked from now on forward to this process."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        forward_in_forked_workers()
        if watch_launcher:
            watch_runner(self)
        return self

    def request(self, reason: str) -> None:
        if not self.requested:
            self.reason = reason
        self.requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)


def forward_in_forked_workers() -> None:
    """Every child this process forks from now on (its DataLoader workers) blocks the stop signals
    and forwards each to its parent; a SIGTERM from the parent itself (DataLoader shutting down a
    worker) still ends the worker, as torch's own handler would."""
    global _workers_forward
    if not _workers_forward:
        os.register_at_fork(after_in_child=_worker_forwarder)
        _workers_forward = True


def _worker_forwarder() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by every thread started below
    parent = os.getppid()

    def forward() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_pid == parent and info.si_signo == signal.SIGTERM:
                os._exit(0)  # the rank ends its worker
            try:
                os.kill(parent, info.si_signo)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=forward, name="moma-stop-forward", daemon=True).start()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # after "(comm)": state, ppid
    except (OSError, IndexError, ValueError):
        return None


def watch_runner(stop: StopRequest, every_s: float = 1.0) -> threading.Thread | None:
    """Under DeepSpeed's launch.py only (torchrun, srun: their own rules): request a stop when the
    launcher's parent (the runner) changes, i.e. died, or the launcher itself did."""
    launcher = os.getppid()
    runner = _ppid(launcher)
    if runner is None or not any(name in _cmdline(launcher) for name in LAUNCHERS):
        return None

    def watch() -> None:
        while not stop.requested:
            time.sleep(every_s)
            if os.getppid() != launcher or _ppid(launcher) != runner:
                stop.request("launcher gone")
                print(f"warning: the process that launched this rank (runner pid {runner}, launcher pid {launcher}) "
                      f"is gone: checkpointing and stopping", file=sys.stderr, flush=True)
                return

    thread = threading.Thread(target=watch, name="moma-runner-watch", daemon=True)
    thread.start()
    return thread
