"""Logging people use: TensorBoard is checked before launch (`moma train --check`), not found
missing after it.

    .venv/bin/python -m pytest tests/test_logging.py -x -q
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from launch_fixtures import REPO, cpu_env
from training_fixtures import make_training_data, run_config, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


def test_tensorboard_is_checked_before_launch(data: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run"), tmp_path / "run.yaml")
    check = subprocess.run([sys.executable, "-m", "moma.pipeline.cli", "train", str(config), "logging.tensorboard=true",
                            "--check", "--world-size", "2"], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                           timeout=300)
    if importlib.util.find_spec("tensorboard") is None:
        assert check.returncode == 2 and "tensorboard package is not installed" in check.stderr, check.stderr
        assert len(check.stderr.strip().splitlines()) == 1
    else:
        assert check.returncode == 0, check.stderr
