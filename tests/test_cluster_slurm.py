"""The README's SLURM commands on a real single-node SLURM (munged, slurmctld, slurmd on 127.0.0.1,
started here; tests/cluster_fixtures.py):

* `sbatch jobs/slurm_train.sbatch CONFIG` trains with the per-step losses and documents of a one-host
  2-rank deepspeed run;
* preemption by `scancel --signal=USR1 --batch` (what `--signal=B:USR1@120` does before the time
  limit), twice in one run: each time the ranks checkpoint, the job requeues itself and is running
  again within seconds (nobody forcing `StartTime=now`, which races SLURM's credential revocation),
  and the run ends equal to the uninterrupted one;
* a requeue by SLURM (`scontrol requeue`): SIGTERM, the ranks checkpoint, the job resumes and ends equal;
* `jobs/slurm_shards_submit.sh` as a real array job + merge: shards byte-identical to a local build,
  and still after one array task was killed (its merge dropped) and the same line submitted again.

    .venv/bin/python -m pytest tests/test_cluster_slurm.py -q     (needs: apt-get install slurm-wlm munge)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixtures import (
    INSTALL,
    SLURM_TOOLS,
    SlurmCluster,
    assert_same_run,
    cluster_dir,
    missing,
    one_host_reference,
    running,
    wait_for,
)
from launch_fixtures import REPO, VENV_BIN
from training_fixtures import make_training_data, run_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(bool(missing(SLURM_TOOLS)),
                                 reason=f"no {', '.join(missing(SLURM_TOOLS))} here ({INSTALL}; CI installs them)")]
STEPS = 16
CPU_JOB = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]  # the script asks for 8 GPUs
RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    with running(SlurmCluster(cluster_dir("moma-slurm-")), "SLURM", TIMINGS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted one-host run: deepspeed launcher, 2 gloo ranks."""
    return one_host_reference(data, tmp_path_factory.mktemp("reference"), STEPS)


def submit(slurm: SlurmCluster, config: Path, log: Path) -> str:
    """The README's line, from the checkout, on this cluster's CPUs."""
    out = slurm.client("sbatch", "--parsable", *CPU_JOB, f"--output={log}", "jobs/slurm_train.sbatch", str(config),
                       cwd=REPO, env=RANK_ENV).stdout.strip()
    return out.split(";")[0]


def steps_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def wait_steps(slurm: SlurmCluster, job: str, run: Path, n: int, timeout: float = 300) -> None:
    def reached() -> bool:
        state = slurm.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step {n}"
        return steps_done(run) >= n
    wait_for(reached, f"step {n} of job {job}", timeout, poll=0.05)


def test_sbatch_trains_like_one_host(slurm: SlurmCluster, data: dict[str, Path], reference: Path,
                                     tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run", max_steps=STEPS), tmp_path / "run.yaml")
    t = time.monotonic()
    job = submit(slurm, config, tmp_path / "job.out")
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400) == "COMPLETED", \
        (tmp_path / "job.out").read_text()[-3000:]
    TIMINGS["sbatch train"] = time.monotonic() - t
    info = slurm.job(job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert_same_run(reference, tmp_path / "run", STEPS)


def test_usr1_preemption_requeues_itself_and_ends_like_an_uninterrupted_run(
        slurm: SlurmCluster, data: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    """Twice in one run: USR1 to the batch shell -> the ranks checkpoint at the step reached -> the
    job requeues itself and runs again within 60 s of that (SLURM alone holds it ~120 s; forcing
    `StartTime=now` fails the job when it lands in the requeue's second) -> resumes exactly."""
    config = write_config(run_config(data, tmp_path / "run", max_steps=STEPS), tmp_path / "run.yaml")
    log = tmp_path / "job.out"
    t = time.monotonic()
    job = submit(slurm, config, log)
    restart_s = []
    for restarts, at_step in ((1, 3), (2, 8)):
        wait_steps(slurm, job, tmp_path / "run", at_step)
        slurm.client("scancel", "--signal=USR1", "--batch", job)
        # the ranks finish their step, checkpoint and exit; then the job requeues itself
        wait_for(lambda: slurm.state(job) != "RUNNING", f"job {job} to requeue itself", 300, poll=0.1)
        requeued = time.monotonic()

        def back(restarts: int = restarts) -> bool:
            info = slurm.job(job)
            assert info["JobState"] not in ("FAILED", "CANCELLED", "COMPLETED"), (info, log.read_text()[-3000:])
            return info["Restarts"] == str(restarts) and info["JobState"] == "RUNNING"
        wait_for(back, f"job {job} to run again after requeue {restarts}", 60 + 60, poll=0.2)
        restart_s.append(time.monotonic() - requeued)
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 400) == "COMPLETED", log.read_text()[-3000:]
    TIMINGS["USR1 preemption x2"] = time.monotonic() - t
    TIMINGS.update({f"requeue {i + 1} -> running again": s for i, s in enumerate(restart_s)})
    info = slurm.job(job)
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0"
    text = log.read_text()
    assert text.count("checkpointed at step") == 2 and text.count("resumed from") == 2, text[-3000:]
    assert text.count("requeueing job") == 2
    assert all(s < 60 for s in restart_s), restart_s  # seconds from the requeue until running again
    assert_same_run(reference, tmp_path / "run", STEPS)


def test_requeue_by_slurm_checkpoints_and_resumes(slurm: SlurmCluster, data: dict[str, Path], reference: Path,
                                                  tmp_path: Path) -> None:
    """`scontrol requeue J` (what preemption with PreemptMode=REQUEUE does): SIGTERM to every process
    of the job; the ranks checkpoint within KillWait; the job comes back and ends equal."""
    config = write_config(run_config(data, tmp_path / "run", max_steps=STEPS), tmp_path / "run.yaml")
    log = tmp_path / "job.out"
    t = time.monotonic()
    job = submit(slurm, config, log)
    wait_steps(slurm, job, tmp_path / "run", 3)
    slurm.client("scontrol", "requeue", job)
    wait_for(lambda: slurm.job(job)["JobState"] == "PENDING", f"job {job} to be requeued", 120, poll=0.2)
    # SLURM holds a requeued job back ~120 s; `now` could land in the requeue's second, which slurmd
    # refuses (the job FAILS, exit 1, no output): 2 s out is past it
    slurm.client("scontrol", "update", f"jobid={job}", "StartTime=now+2")
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 400) == "COMPLETED", log.read_text()[-3000:]
    TIMINGS["scontrol requeue"] = time.monotonic() - t
    text = log.read_text()
    assert "checkpointed at step" in text and "resumed from" in text, text[-3000:]
    assert slurm.job(job)["Restarts"] == "1"
    assert_same_run(reference, tmp_path / "run", STEPS)


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)}


def test_shard_array_job_equals_a_local_build_even_after_a_failed_task(slurm: SlurmCluster, data: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    shapes = data["captions"].parent / "shapes"
    args = ["--source", f"folder:{shapes}", "--order", "random", "--text-tokenizer", str(data["text"]),
            "--image-tokenizer", str(data["image"]), "--max-docs-per-shard", "16"]
    n = 3
    local = tmp_path / "local"
    subprocess.run([str(VENV_BIN / "moma"), "shards", "build", *args, "--out", str(local), "--num-partitions",
                    str(n), "--workers", "1"], check=True, capture_output=True, timeout=300)
    env = {"MOMA_SBATCH_ARGS": "--cpus-per-task=1"}

    def submit_shards(out: Path) -> tuple[str, str]:
        line = slurm.client("bash", str(REPO / "jobs" / "slurm_shards_submit.sh"), str(n), str(out), *args,
                            cwd=tmp_path, env=env).stdout
        words = line.split()  # "submitted partitions as job A, merge as job M"
        return words[words.index("job") + 1].rstrip(","), words[-1]

    # one clean run
    t = time.monotonic()
    array, merge = submit_shards(tmp_path / "slurm")
    slurm.wait_gone([array, merge], 300)
    TIMINGS["shards array"] = time.monotonic() - t
    assert slurm.state(merge) == "COMPLETED", list(tmp_path.glob("slurm-*.out"))
    expected = _tree(local)
    assert "manifest.json" in expected and len(expected) > 3
    assert _tree(tmp_path / "slurm") == expected
    # one task killed while it runs: the merge is dropped; the same line again completes the build
    t = time.monotonic()
    out = tmp_path / "again"
    array, merge = submit_shards(out)
    wait_for(lambda: slurm.state(f"{array}_1") == "RUNNING", f"task {array}_1 to run", 300, poll=0.05)
    slurm.client("scancel", "--signal=KILL", "--full", f"{array}_1")
    slurm.wait_gone([array, merge], 300)
    assert slurm.state(f"{array}_1") in ("FAILED", "CANCELLED")
    assert slurm.state(merge) != "COMPLETED" and not (out / "manifest.json").exists()
    array, merge = submit_shards(out)
    slurm.wait_gone([array, merge], 300)
    TIMINGS["shards array, failed task, rerun"] = time.monotonic() - t
    assert slurm.state(merge) == "COMPLETED"
    assert _tree(out) == expected
