"""The GPU machine's recipe (jobs/gpu/): the carried wheels install on its Python 3.12 next to its own
torch and numpy, and the two GPU scripts fit their 8-minute budget. The wheel tests need PyPI
(as CI has) and build the wheel folder with the real script.

    .venv/bin/python -m pytest tests/test_gpu_recipe.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launch_fixtures import free_port
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "jobs" / "gpu"
# the GPU machine: Linux x86_64, CPython 3.12.3
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def image_packages() -> set[str]:
    lines = (GPU / "image_packages.txt").read_text().splitlines()
    return {canonicalize_name(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run(["bash", str(GPU / "build_wheels.sh"), str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def dry_run_312(wheels: Path, target: Path, *requirements: str, deps: bool) -> dict:
    """pip's own resolver, as for the GPU machine's Python 3.12, offline from the wheel folder."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheels),
           "--target", str(target), "--python-version", "3.12", "--only-binary=:all:", "--report", "-", "-q",
           *([] if deps else ["--no-deps"]), *requirements]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "PIP_CONFIG_FILE": os.devnull})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_every_carried_wheel_installs_on_python_312_without_torch_or_numpy(wheels: Path, tmp_path: Path) -> None:
    files = sorted(p.name for p in wheels.glob("*.whl"))
    carried = {canonicalize_name(f.split("-")[0]): Version(f.split("-")[1]) for f in files}
    assert not carried.keys() & {"torch", "numpy"}, files  # the image's CUDA torch and its numpy stay
    assert {"deepspeed", "webdataset", "braceexpand", "pydantic", "pydantic-core", "hjson"} <= carried.keys()
    assert not carried.keys() & image_packages() - {"typing-extensions"}, "carries what the image has"
    assert any(f.startswith("deepspeed-") and f.endswith("-py3-none-any.whl") for f in files), files
    report = dry_run_312(wheels, tmp_path / "site", *(f"{n}=={v}" for n, v in carried.items()), deps=False)
    resolved = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in report["install"]}
    assert resolved == carried  # every file, cp312 or py3, is installable on 3.12
    # and every dependency of what is carried is carried at a version that satisfies it, or is in the image
    for item in report["install"]:
        for spec in item["metadata"].get("requires_dist", []):
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue
            name = canonicalize_name(req.name)
            if name in carried:
                assert req.specifier.contains(carried[name], prereleases=True), (item["metadata"]["name"], spec)
            else:
                assert name in image_packages(), f"{item['metadata']['name']} needs {spec}: neither carried nor in " \
                                                 f"the image"
    requirements = (wheels / "requirements.txt").read_text().split()
    assert {canonicalize_name(Requirement(r).name) for r in requirements} == {"deepspeed", "webdataset", "braceexpand"}


@pytest.mark.slow
def test_env_sh_installs_only_what_is_missing_and_maps_moma(wheels: Path, tmp_path: Path) -> None:
    """env.sh end to end with this venv standing in for the image: everything is installed here, so
    pip's plan is empty, nothing is written next to the interpreter, and moma (moma.load included)
    imports from the checkout's files."""
    (tmp_path / "jobs" / "gpu").mkdir(parents=True)
    os.symlink(wheels, tmp_path / "jobs" / "gpu" / "wheels")
    for d in ("pipeline", "tokenizers", "ds_configs", "moma"):
        os.symlink(REPO / d, tmp_path / d)
    (tmp_path / "jobs" / "configs").symlink_to(REPO / "jobs" / "configs")
    script = (f"set -euo pipefail; source {GPU / 'env.sh'}; "
              "python -c 'import moma, moma.pipeline.training.engine as e; print(callable(moma.load), e.__file__)'")
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "installed 0 carried wheel(s)" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("True ") and Path(last.split()[1]).resolve() == REPO / "pipeline/training/engine.py", last


def step_limits(script: Path) -> list[int]:
    """The seconds of each `run_step NAME SECONDS ...` line (each step runs under `timeout SECONDS`)."""
    return [int(n) for n in re.findall(r"^run_step \S+ (\d+) ", script.read_text(), re.M)]


def test_gpu_scripts_use_the_recipe_and_fit_eight_minutes() -> None:
    """Both scripts install through env.sh (no pip of their own, which would write into the image)
    and every step runs under its time limit: the limits plus each script's setup allowance add up
    to <= 480 s, one device run."""
    total = 0
    for name in ("gpu_check.sh", "flops_savings.sh"):
        text = (GPU / name).read_text()
        assert "source jobs/gpu/env.sh" in text, name
        assert "pip install" not in text, name
        assert 'timeout "$secs" "$@"' in text, name  # run_step enforces the limits it is given
        steps = step_limits(GPU / name)
        assert steps, name
        setup = re.search(r"^# setup allowance: (\d+) s", text, re.M)
        assert setup, f"{name}: its header states the setup allowance"
        total += sum(steps) + int(setup.group(1))
    assert total <= 480, total


def test_the_gpu_scale_trains_bf16_and_logs_statistics_sparsely() -> None:
    """The gpu scale of flops-savings: bf16 with fp32 accumulation, statistics on every 25th step, and
    the four launches flops_savings.sh states (dense 0.5/1/2x + moma_4t4i), 900 steps in all."""
    from moma.pipeline.experiments.flops_savings import SCALES, plan_runs

    gpu = SCALES["gpu"]
    assert gpu.ds_config == "zero2_bf16" and gpu.log_every == 25 and gpu.ranks == 1
    runs = plan_runs(gpu, ["dense", "moma_4t4i"], gpu.seeds)
    assert len(runs) == 4 and sum(r.steps for r in runs) == 900
    assert all(r.steps % gpu.log_every == 0 for r in runs)  # the final step is a logged one
    assert "--variants moma_4t4i " in (GPU / "flops_savings.sh").read_text()


@pytest.mark.slow
def test_gpu_check_runs_moma_trains_path_on_cpu() -> None:
    """gpu_check.py's smoke mode: the bf16 model, the zero1_bf16 engine and a step on the CPU, one
    JSON line per variant with the dry run's plan next to the measurement."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(GPU / "gpu_check.py"), "--device", "cpu", "--presets", "tiny",
                           "--ffn", "moma_4t4i", "--seq-len", "64", "--steps", "1"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"bench": "gpu_check"')]
    assert [(r["preset"], r["ffn"], r["ds_config"]) for r in rows] == [("tiny", "moma_4t4i", "zero1_bf16")]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["dry_run_gb"]["activations"] > 0
