"""A signal to any process of a job saves it: the real launcher, 2 gloo ranks, a tiny model.

    .venv/bin/python -m pytest tests/test_signals.py -m slow

SIGTERM or SIGINT to a rank, a DataLoader worker, DeepSpeed's node launcher (launch.py), the runner
(what jobs/train_local.sh execs), the stock `deepspeed` runner alone, or the whole process group
(`timeout`, `kill -- -PGID`, systemd, schedulers): the current step finishes, the job checkpoints
and exits 0, no process of it is left, `latest` names the step reached, and the resumed run's
per-step losses and documents equal an uninterrupted run's. And a flipped bit inside a tensor of the
newest checkpoint: `--resume auto` warns, naming the file, and resumes from the previous one exactly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launch_fixtures import REPO, VENV_BIN, cpu_env, free_port, run_deepspeed
from training_fixtures import make_training_data, run_config, write_config

from moma.pipeline.launch import NODE
from moma.pipeline.training.metrics import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 40  # the schedule's length; the signal lands a few steps in
TRAIN = ["--module", "moma.pipeline.cli", "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (checkpoints at 10, 20, 30, 40: saving changes no number)."""
    d = tmp_path_factory.mktemp("reference")
    config = write_config(run_config(data, d / "run", max_steps=STEPS, checkpoint__every=10), d / "run.yaml")
    run_deepspeed([*TRAIN, str(config), "--resume", "auto"], log=d / "log")
    return d / "run"


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def job_processes(config: Path) -> list[psutil.Process]:
    """Every live process of the job: runner, launcher, ranks and their workers (forked: same command)."""
    return [p for p in psutil.process_iter() if str(config) in _cmd(p) and p.status() != psutil.STATUS_ZOMBIE]


def pick(runner: int, target: str) -> psutil.Process:
    launcher = next(c for c in psutil.Process(runner).children()
                    if NODE in _cmd(c) or "deepspeed.launcher.launch" in _cmd(c))
    if target == "launcher":
        return launcher
    rank = next(c for c in launcher.children() if "--local_rank=1" in _cmd(c))
    if target == "rank":
        return rank
    return rank.children()[0]  # its DataLoader worker


def launch(target: str, config: Path) -> subprocess.Popen:
    """The job in its own process group: train_local.sh for "runner", the stock `deepspeed` runner
    for "stock-runner", else `python -m moma.pipeline.launch`."""
    env = cpu_env(MASTER_PORT=str(free_port()))
    if target == "runner":
        cmd = ["bash", "jobs/train_local.sh", str(config), "2"]
    else:
        runner = [str(VENV_BIN / "deepspeed")] if target == "stock-runner" else [sys.executable, "-m",
                                                                                 "moma.pipeline.launch"]
        cmd = [*runner, "--num_gpus", "2", "--master_port", env["MASTER_PORT"], *TRAIN, str(config), "--resume",
               "auto"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_steps(run: Path, proc: subprocess.Popen, n: int) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < n:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no training steps within 300 s"
        time.sleep(0.05)


def assert_same_as(reference: Path, run: Path, steps: list[int]) -> None:
    a = {r["step"]: r for r in read_metrics(reference)}
    b = read_metrics(run)
    assert [r["step"] for r in b] == steps
    for rb in b:
        ra = a[rb["step"]]
        assert ra["docs_digest"] == rb["docs_digest"], rb["step"]  # the same documents, step by step
        for key in ("loss", "loss_text", "loss_image"):  # None: no target of that modality in the step
            same = ra[key] == rb[key] or (None not in (ra[key], rb[key]) and abs(ra[key] - rb[key]) <= 1e-6)
            assert same, (rb["step"], key, ra[key], rb[key])


@pytest.mark.parametrize("target,sig", [pytest.param(t, s, id=f"{t}-{s.name}") for t, s in [
    ("group", signal.SIGTERM), ("launcher", signal.SIGTERM), ("runner", signal.SIGTERM), ("rank", signal.SIGTERM),
    ("worker", signal.SIGTERM), ("stock-runner", signal.SIGTERM), ("group", signal.SIGINT),
    ("worker", signal.SIGINT), ("runner", signal.SIGINT)]])
def test_a_signal_to_any_process_of_the_job_checkpoints_and_exits_zero(
        reference: Path, data: dict[str, Path], tmp_path: Path, target: str, sig: signal.Signals) -> None:
    """Old code: group / launcher -> every rank died ("DataLoader worker (pid ...) is killed by signal:
    Terminated"), exit 143 or 1, no checkpoint; runner -> it alone died, the ranks trained on."""
    config = write_config(run_config(data, tmp_path / "run", max_steps=STEPS, checkpoint__every=1000),
                          tmp_path / "run.yaml")
    proc = launch(target, config)
    try:
        wait_for_steps(tmp_path / "run", proc, 2)
        if target == "group":
            os.killpg(proc.pid, sig)
        elif target in ("runner", "stock-runner"):
            proc.send_signal(sig)
        else:
            pick(proc.pid, target).send_signal(sig)
        out, _ = proc.communicate(timeout=300)
        deadline = time.time() + 120
        while job_processes(config) and time.time() < deadline:  # the stock runner does not wait
            time.sleep(0.2)
        assert not job_processes(config), [(p.pid, _cmd(p)) for p in job_processes(config)]  # no orphans
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if target == "stock-runner":
        assert proc.returncode == -sig  # it has no handler; its ranks saw it go and saved
    else:
        assert proc.returncode == 0, out[-3000:]
        assert "preemption signal: checkpointed at step" in out
    rows = read_metrics(tmp_path / "run")
    step = rows[-1]["step"]
    assert 2 <= step < STEPS - 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"global_step{step}"
    run_deepspeed([*TRAIN, str(config), f"stop_at_step={step + 2}", "--resume", "auto"], log=tmp_path / "log2")
    assert_same_as(reference, tmp_path / "run", list(range(1, step + 3)))


def flip_a_bit_inside_a_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor a torch.save file holds (stored uncompressed)."""
    import torch

    from moma.pipeline.training.checkpoint import safe_load

    found: list[torch.Tensor] = []

    def walk(x: object) -> None:
        if torch.is_tensor(x):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(safe_load(path))
    raw = max(found, key=lambda t: t.numel()).contiguous().numpy().tobytes()
    data = path.read_bytes()
    at = data.index(raw[len(raw) // 2:len(raw) // 2 + 256]) + 100
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x04]) + data[at + 1:])


def test_a_flipped_bit_in_the_newest_checkpoint_resumes_from_the_previous_one(reference: Path,
                                                                               tmp_path: Path) -> None:
    """Old code: the damaged optimizer state loaded silently (torch.load checks no zip CRC)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = tmp_path / "run.yaml"
    config.write_text((reference.parent / "run.yaml").read_text().replace(str(reference), str(run)))
    (run / "metrics.jsonl").write_text("")
    damaged = run / "checkpoints" / f"global_step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_a_bit_inside_a_tensor(damaged)
    proc = run_deepspeed([*TRAIN, str(config), "--resume", "auto"], log=tmp_path / "log")
    out = proc.stdout + proc.stderr
    assert f"{damaged}: crc32" in out and "(the file is damaged)" in out
    assert f"resuming from the newest intact complete checkpoint instead: {run / 'checkpoints'}/global_step30" in out
    assert_same_as(reference, run, list(range(31, STEPS + 1)))
