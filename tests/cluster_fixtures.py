"""Real cluster daemons on loopback addresses for the cluster tests, started and stopped by the tests.

* `SshHosts`: one sshd listening on 127.0.0.2 and 127.0.0.3 (two "hosts" for the deepspeed launcher's
  pdsh runner), a key pair and an ssh config of its own, and an `ssh` wrapper first on PATH so that
  pdsh and DeepSpeed's pre-launch check (plain `ssh HOST hostname`) both use that config.
* `SlurmCluster`: munged, slurmctld and one slurmd (node1, NodeAddr 127.0.0.1, every CPU) with their
  state, spool, sockets and logs in one directory; `SLURM_CONF` goes into `env()` for every client.

Every daemon runs under `timeout` (so a crashed test run cannot leave one behind for long), in its
own session; `stop()` ends the daemons, then every process that carries the cluster's tag in its
environment (jobs, job steps, ssh sessions and the ranks they started). Only 127.0.0.0/8 is used:
munged's origin, the SLURM daemons' addresses, sshd's listen addresses, and the gloo interface
(`lo`) the tests give the ranks.

Traps met here (kept so nobody meets them again): sshd needs /run/sshd; StrictModes refuses keys
under /tmp (our own sshd_config turns it off); munged wants its socket directory and its parents
mode 755 (pytest's tmp_path is 0700, so these directories come from `cluster_dir`); every client
command needs SLURM_CONF; GNU nproc honours OMP_NUM_THREADS (getconf counts the CPUs); a requeued job
waits ~120 s before it may start again unless `scontrol update jobid=J StartTime=now` once PENDING.

    .venv/bin/python tests/cluster_fixtures.py slurm   # start one by hand; Ctrl-C stops it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import psutil

D = typing.TypeVar("D", bound="Daemons")

TAG = "MOMA_TEST_CLUSTER"  # in the environment of every process a cluster starts, so stop() finds them all
DAEMON_LIMIT_S = 3600  # `timeout` for every daemon: an aborted test run cannot leave one for longer

SSH_TOOLS = {"sshd": "/usr/sbin/sshd", "ssh": "ssh", "ssh-keygen": "ssh-keygen", "pdsh": "pdsh"}
SLURM_TOOLS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd",
               "sbatch": "sbatch", "scontrol": "scontrol", "squeue": "squeue", "scancel": "scancel"}
INSTALL = "apt-get install -y slurm-wlm munge openssh-server pdsh"


def missing(tools: dict[str, str]) -> list[str]:
    """The tools of `tools` not installed here."""
    return [name for name, path in tools.items() if not (os.access(path, os.X_OK) if "/" in path
                                                          else shutil.which(path))]


def cluster_dir(prefix: str) -> Path:
    """A fresh directory under /tmp, mode 755 (munged refuses a socket directory with 0700 parents,
    which pytest's tmp_path has)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


def free_port(host: str = "127.0.0.1", also: tuple[str, ...] = ()) -> int:
    """A TCP port free on `host` (and on each of `also`)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        try:
            for other in also:
                with socket.socket() as s:
                    s.bind((other, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on {host} and {also}")


def wait_for(check: callable, what: str, timeout: float, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def kill_tagged(value: str, sig: int = signal.SIGKILL) -> int:
    """Signal every process whose environment has TAG=value; how many there were."""
    n = 0
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(TAG) == value:
                p.send_signal(sig)
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return n


class Daemons:
    """Processes started under `timeout`, each in its own session, stopped together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.env = dict(os.environ, **{TAG: str(root)})  # for clients: what they start is tagged
        # the daemons themselves untagged: kill_tagged (after a test's launch) must not hit them
        self.daemon_env = {k: v for k, v in self.env.items() if k != TAG}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "wb")
        proc = subprocess.Popen(["timeout", "-k", "5", str(DAEMON_LIMIT_S), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.daemon_env,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.root / f"{name}.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def kill_leftovers(self) -> None:
        """Processes of the cluster that kill_tagged cannot see (none here)."""

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:  # the whole session's group: the daemon outlives its `timeout` if that was killed alone
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            self._signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._signal_group(proc, signal.SIGKILL)  # whatever of the group is left
            proc.wait(timeout=10)
        kill_tagged(str(self.root))  # whatever they started: job steps, ssh sessions, ranks
        self.kill_leftovers()
        if not os.environ.get("MOMA_KEEP_CLUSTER"):  # set it to keep the daemons' logs
            shutil.rmtree(self.root, ignore_errors=True)


class SshHosts(Daemons):
    """sshd on 127.0.0.2 and 127.0.0.3 (one port), reached with a key of its own."""

    hosts = ("127.0.0.2", "127.0.0.3")

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.port = free_port(self.hosts[0], also=self.hosts[1:])
        self.bin = root / "bin"

    def start_all(self) -> SshHosts:
        r = self.root
        for key in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / key)], check=True,
                           timeout=30)
        shutil.copy(r / "id.pub", r / "authorized_keys")
        listen = "\n".join(f"ListenAddress {h}:{self.port}" for h in self.hosts)
        (r / "sshd_config").write_text(
            f"{listen}\nHostKey {r}/host_key\nAuthorizedKeysFile {r}/authorized_keys\nPidFile {r}/sshd.pid\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"PermitRootLogin prohibit-password\nPrintMotd no\nAcceptEnv {TAG}\nMaxStartups 100\n"
            "LogLevel VERBOSE\n")
        (r / "ssh_config").write_text(
            f"Host {' '.join(self.hosts)}\n  Port {self.port}\n  IdentityFile {r}/id\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
            f"  SetEnv {TAG}={r}\n")
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {r}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        self.start("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(r / "sshd_config")])

        def up() -> bool:
            self.check_alive()
            try:
                for h in self.hosts:
                    socket.create_connection((h, self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(up, "sshd to listen", 20)
        probe = subprocess.run(["ssh", self.hosts[1], "hostname"], env=self.client_env(), capture_output=True,
                               text=True, timeout=30)
        if probe.returncode != 0:
            raise RuntimeError(f"ssh {self.hosts[1]} hostname: {probe.stderr}\n"
                               f"{(r / 'sshd.out').read_text(errors='replace')[-2000:]}")
        return self

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment for the launching side: our `ssh` first on PATH."""
        env = dict(os.environ, **extra)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        env[TAG] = str(self.root)
        return env

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        path.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        return path


class SlurmCluster(Daemons):
    """munged + slurmctld + slurmd (one node with every CPU) on 127.0.0.1."""

    node = "node1"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.conf = root / "slurm.conf"
        for env in (self.env, self.daemon_env):  # every client command needs it, jobs too
            env["SLURM_CONF"] = str(self.conf)

    def start_all(self) -> SlurmCluster:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(mode=0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.sock"
        self.start("munged", ["/usr/sbin/munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                              f"--log-file={r}/log/munged.log", f"--pid-file={r}/munge/munged.pid",
                              f"--seed-file={r}/munge/seed", "--origin=127.0.0.1"])
        wait_for(lambda: self.check_alive() or sock.exists(), "munged's socket", 20)
        user = psutil.Process().username()
        cpus = os.sysconf("SC_NPROCESSORS_ONLN")  # not `nproc`: it honours OMP_NUM_THREADS
        ctld_port, d_port = free_port(), free_port()
        self.conf.write_text(f"""ClusterName=momatest
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self.start("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        self.start("slurmd", ["/usr/sbin/slurmd", "-D", "-N", self.node, "-f", str(self.conf)])

        def idle() -> bool:
            self.check_alive()
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True,
                                 timeout=30).stdout.strip()
            return out == "idle"
        wait_for(idle, "the SLURM node to be idle", 60, poll=0.3)
        return self

    def stop(self) -> None:
        if self.procs and all(p.poll() is None for _, p in self.procs):
            subprocess.run(["scancel", "--full", "--user", psutil.Process().username()], env=self.env,
                           capture_output=True, timeout=30)
            try:  # let slurmd end the jobs' steps itself
                wait_for(lambda: not subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True,
                                                    timeout=30).stdout.strip(), "the queue to empty", 40, poll=0.5)
            except (TimeoutError, subprocess.TimeoutExpired):
                pass
        super().stop()

    def kill_leftovers(self) -> None:
        # a job step's slurmstepd outliving slurmd (its title hides its environment): it holds our logs
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "slurmstepd" and any(f.path.startswith(str(self.root)) for f in p.open_files()):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def client(self, *cmd: str, check: bool = True, timeout: float = 60, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, scontrol...) against this cluster."""
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o J` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.client("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        got = []

        def reached() -> bool:
            self.check_alive()
            got[:] = [self.state(job_id)]
            return got[0] in states
        wait_for(reached, f"job {job_id} to be one of {sorted(states)} (is {got})", timeout, poll=0.2)
        return got[0]

    def wait_gone(self, job_ids: list[str], timeout: float) -> None:
        """Until none of the jobs is pending, running or completing (array tasks included)."""
        def gone() -> bool:
            self.check_alive()
            out = self.client("squeue", "-h", "-j", ",".join(job_ids)).stdout
            return not out.strip()
        wait_for(gone, f"jobs {job_ids} to leave the queue", timeout, poll=0.3)


def assert_same_run(reference: Path, run: Path, steps: int) -> float:
    """`run`'s metrics.jsonl has steps 1..steps with the reference's losses (by modality) and the same
    documents step by step; returns the largest loss difference."""
    from moma.pipeline.training.metrics import read_metrics

    a, b = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert [r["step"] for r in b] == list(range(1, steps + 1)), [r["step"] for r in b]
    worst = 0.0
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_text", "loss_image"):  # None: no target of that modality in the step
            if ra[key] is None or rb[key] is None:
                assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
                continue
            worst = max(worst, abs(ra[key] - rb[key]))
            assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], key, ra[key], rb[key])
        assert ra["docs_digest"] == rb["docs_digest"], ra["step"]  # the same documents, step by step
    assert a[-1]["tokens_seen"] == b[-1]["tokens_seen"]
    return worst


if __name__ == "__main__":
    import sys

    kind = sys.argv[1] if len(sys.argv) > 1 else "slurm"
    cluster = (SlurmCluster if kind == "slurm" else SshHosts)(cluster_dir(f"moma-{kind}-"))
    try:
        cluster.start_all()
        print(f"up in {cluster.root}" + (f"; export SLURM_CONF={cluster.conf}" if kind == "slurm" else
                                          f"; export PATH={cluster.bin}:$PATH"), flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


@contextlib.contextmanager
def running(daemons: D, label: str, timings: dict[str, float]) -> Iterator[D]:
    """A module's daemons, started (timed into `timings`) and always stopped; the scenario wall times
    are printed at the end (`pytest -s` shows them)."""
    try:
        t = time.monotonic()
        daemons.start_all()
        timings[f"{label} start"] = time.monotonic() - t
        yield daemons
    finally:
        daemons.stop()
        print(f"\n{label} scenario wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def one_host_reference(data: dict[str, Path], d: Path, steps: int) -> Path:
    """The uninterrupted one-host run every cluster scenario is compared with: the deepspeed launcher,
    2 gloo ranks, `steps` steps; returns its run directory."""
    from launch_fixtures import run_deepspeed
    from training_fixtures import run_config, write_config

    config = write_config(run_config(data, d / "run", max_steps=steps), d / "run.yaml")
    run_deepspeed(["--module", "moma.pipeline.cli", "train", str(config), "--resume", "auto"], log=d / "log")
    return d / "run"
