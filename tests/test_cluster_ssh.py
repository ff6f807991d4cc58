"""The README's multi-host line, `bash jobs/train_multinode.sh HOSTFILE CONFIG`, on two "hosts":
sshd listening on 127.0.0.2 and 127.0.0.3 (started here, tests/cluster_fixtures.py), the deepspeed
launcher's pdsh runner, one slot each, moma_4t4i tiny with expert parallelism 2 across the hosts:

* the per-step losses and documents equal a one-host 2-rank run's, and the script wrote the
  `.deepspeed_env` that the remote ranks need (PATH, DS_ACCELERATOR, OMP_NUM_THREADS, the interface);
* SIGKILL to the rank on 127.0.0.3 mid-run, then the same line again (`--resume auto`): equal again;
* an existing `.deepspeed_env` lacking a key, or with a line the runner cannot parse, is refused
  with one line naming the file and the key (no daemon needed).

    .venv/bin/python -m pytest tests/test_cluster_ssh.py -q   (needs: apt-get install openssh-server pdsh)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cluster_fixtures import (
    INSTALL,
    SSH_TOOLS,
    TAG,
    SshHosts,
    assert_same_run,
    cluster_dir,
    free_port,
    kill_tagged,
    missing,
    one_host_reference,
    running,
    wait_for,
)
from launch_fixtures import REPO
from training_fixtures import make_training_data, run_config, write_config

STEPS = 8
SCRIPT = REPO / "jobs" / "train_multinode.sh"
needs_ssh = pytest.mark.skipif(bool(missing(SSH_TOOLS)),
                               reason=f"no {', '.join(missing(SSH_TOOLS))} here ({INSTALL}; CI installs them)")
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def hosts() -> Iterator[SshHosts]:
    with running(SshHosts(cluster_dir("moma-ssh-")), "multi-host", TIMINGS) as ssh:
        yield ssh


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-host run: deepspeed launcher, 2 gloo ranks."""
    return one_host_reference(data, tmp_path_factory.mktemp("reference"), STEPS)


def launch(hosts: SshHosts, workdir: Path, config: Path, log: Path) -> subprocess.Popen:
    """The README's line, run from `workdir` (where `.deepspeed_env` goes) with a bare environment
    for the ranks: nothing of DS_ACCELERATOR / OMP_NUM_THREADS / GLOO_SOCKET_IFNAME is exported
    here, so the remote ranks have only what `.deepspeed_env` gives them."""
    hostfile = hosts.write_hostfile(workdir / "hostfile")
    env = hosts.client_env(MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    for key in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "DS_ENV_FILE"):
        env.pop(key, None)
    with open(log, "ab") as out:
        return subprocess.Popen(["timeout", "-k", "10", "600", "bash", str(SCRIPT), str(hostfile), str(config)],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, hosts: SshHosts, timeout: float = 600) -> int | None:
    """The launch's exit code (None: still running after `timeout`, then killed); then no process
    of it is left, here or on the "hosts"."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_tagged(str(hosts.root))  # ranks the ssh sessions left behind, if any


def ranks(hosts: SshHosts) -> dict[int, psutil.Process]:
    """node rank -> its training rank process (started over ssh, so tagged by our ssh config)."""
    found = {}
    for p in psutil.process_iter():
        try:
            cmd = p.cmdline()
            if (p.environ().get(TAG) != str(hosts.root) or "moma.pipeline.cli" not in cmd
                    or not any(a.startswith("--local_rank=") for a in cmd)):
                continue
            parent = p.parent().cmdline()  # deepspeed's node launcher: ... --node_rank=N ...
            node = [a.split("=", 1)[1] for a in parent if a.startswith("--node_rank=")]
            if "deepspeed.launcher.launch" in parent and node and node[0].isdigit():
                found[int(node[0])] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, AttributeError):
            continue
    return found


@needs_ssh
@pytest.mark.slow
@pytest.mark.distributed
def test_two_hosts_train_like_one_host(hosts: SshHosts, data: dict[str, Path], reference: Path,
                                       tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run", max_steps=STEPS), tmp_path / "run.yaml")
    log = tmp_path / "log"
    t = time.monotonic()
    rc = finish(launch(hosts, tmp_path, config, log), hosts)
    TIMINGS["two-host launch"] = time.monotonic() - t
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "127.0.0.2: " in text and "127.0.0.3: " in text  # a rank on each host
    written = dict(line.split("=", 1) for line in (tmp_path / ".deepspeed_env").read_text().splitlines())
    assert written["DS_ACCELERATOR"] == "cpu" and written["OMP_NUM_THREADS"] == "1"
    assert written["GLOO_SOCKET_IFNAME"] == "lo"  # the interface that reaches 127.0.0.2
    assert str(REPO / ".venv" / "bin") in written["PATH"].split(":")
    print(f"max |loss delta| vs one host: {assert_same_run(reference, tmp_path / 'run', STEPS)}")


@needs_ssh
@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_of_one_hosts_rank_then_the_same_line_resumes_exactly(hosts: SshHosts, data: dict[str, Path],
                                                                      reference: Path, tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run", max_steps=STEPS), tmp_path / "run.yaml")
    log = tmp_path / "log"
    latest = tmp_path / "run" / "checkpoints" / "latest"
    t = time.monotonic()
    proc = launch(hosts, tmp_path, config, log)
    try:
        wait_for(lambda: proc.poll() is None and latest.exists() and latest.read_text() == "global_step4",
                 "the checkpoint at step 4", 400, poll=0.02)
        ranks(hosts)[1].kill()  # the rank on 127.0.0.3, SIGKILL
        killed = time.monotonic()
        rc = proc.wait(timeout=300)  # the whole launch ends ...
        left = ranks(hosts)  # ... and the other host's rank is not left waiting on its peer
    finally:
        finish(proc, hosts, timeout=1)
    assert rc != 0 and not left, (left, log.read_text()[-4000:])
    TIMINGS["launch end after the kill"] = time.monotonic() - killed
    steps_before = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert 4 <= steps_before < STEPS
    rc = finish(launch(hosts, tmp_path, config, log), hosts)
    TIMINGS["two-host kill -9 + resume"] = time.monotonic() - t
    assert rc == 0, log.read_text()[-4000:]
    assert "resumed from" in log.read_text()
    assert_same_run(reference, tmp_path / "run", STEPS)


@pytest.mark.parametrize("content, complaint", [
    ("PATH=/usr/bin\nDS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME=lo\n", "lacks OMP_NUM_THREADS"),
    ("PATH=/usr/bin:{bin}\nDS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n", "lacks GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME"),
    ("PATH=/usr/bin\nDS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\n", "PATH does not hold {bin}"),
    ("PATH={bin}\nDS_ACCELERATOR=cpu\n\nOMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\n", "line 3 is not KEY=VALUE"),
])
def test_an_incomplete_deepspeed_env_is_refused_before_anything_starts(content: str, complaint: str,
                                                                       tmp_path: Path) -> None:
    bin_dir = str(REPO / ".venv" / "bin")
    (tmp_path / ".deepspeed_env").write_text(content.format(bin=bin_dir))
    (tmp_path / "hostfile").write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.deepspeed_env of the user's in the way
    proc = subprocess.run(["bash", str(SCRIPT), "hostfile", str(tmp_path / "missing.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and ".deepspeed_env" in err[0] and complaint.format(bin=bin_dir) in err[0], err
