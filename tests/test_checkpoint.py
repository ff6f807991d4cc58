"""Checkpoint bookkeeping that must survive rollbacks, kills and hostile files: write order, `latest`,
tag reuse, safe loading, RNG states. (The distributed save/resume paths: test_training_distributed.py.)

    .venv/bin/python -m pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moma.pipeline.training.checkpoint import (
    COMPLETE,
    LATEST,
    CheckpointError,
    checkpoints,
    find_checkpoint,
    mark_complete,
    new_tag,
    rng_state,
    safe_load,
    set_rng_state,
)


def save(ckpt: Path, step: int, keep: int = 0) -> str:
    """What a save does, minus DeepSpeed: a fresh tag, a file in it, then `complete` and `latest`."""
    tag = new_tag(ckpt, step)
    (ckpt / tag).mkdir(parents=True)
    (ckpt / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    mark_complete(ckpt, tag, {"step": step}, keep)
    return tag


def test_keep_k_after_a_rollback_keeps_latest_and_orders_by_write_time(tmp_path: Path) -> None:
    for step in (100, 200, 300):
        save(tmp_path, step)
    # resume from 100 (a rollback), train on, save 110 with keep 2: by step the new checkpoint would be
    # the oldest-but-one and deleted, leaving `latest` pointing at nothing
    tag = save(tmp_path, 110, keep=2)
    assert (tmp_path / LATEST).read_text() == tag == "global_step110"
    assert (tmp_path / tag / COMPLETE).exists()
    assert [t for t, _ in checkpoints(tmp_path)] == ["global_step300", "global_step110"]
    assert find_checkpoint("auto", tmp_path) == (tmp_path, "global_step110")


def test_a_tag_is_never_reused(tmp_path: Path) -> None:
    first = save(tmp_path, 200)
    (tmp_path / "global_step400").mkdir()  # a save that was killed half way
    assert new_tag(tmp_path, 200) == "global_step200-v2" and new_tag(tmp_path, 400) == "global_step400-v2"
    again = save(tmp_path, 200)  # the same step once more (after a rollback): a new directory
    assert again == "global_step200-v2" and (tmp_path / first / COMPLETE).exists()
    assert find_checkpoint("auto", tmp_path) == (tmp_path, again)
    assert not (tmp_path / "global_step400").exists()  # debris of the killed save cleaned up


@pytest.mark.parametrize("damage", ["missing_target", "incomplete_target", "no_latest"])
def test_resume_auto_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path, damage: str,
                                                                  capsys: pytest.CaptureFixture) -> None:
    save(tmp_path, 300)
    save(tmp_path, 120)  # written last: the newest, although its step is lower
    if damage == "missing_target":
        (tmp_path / LATEST).write_text("global_step999")
    elif damage == "incomplete_target":
        (tmp_path / "global_step130").mkdir()
        (tmp_path / LATEST).write_text("global_step130")
    else:
        (tmp_path / LATEST).unlink()
    assert find_checkpoint("auto", tmp_path) == (tmp_path, "global_step120")
    out = capsys.readouterr().out
    assert "warning:" in out and "resuming from the newest complete checkpoint" in out
    assert {"missing_target": "'global_step999', which is missing", "incomplete_target": "not complete",
            "no_latest": "latest is missing"}[damage] in out


def test_nothing_to_resume_is_a_fresh_start_or_a_clear_error(tmp_path: Path) -> None:
    assert find_checkpoint("auto", tmp_path / "none") is None
    (tmp_path / "c" / "global_step5").mkdir(parents=True)
    (tmp_path / "c" / LATEST).write_text("global_step5")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*not complete"):
        find_checkpoint("auto", tmp_path / "c")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        find_checkpoint(str(tmp_path / "nowhere"), tmp_path)


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this would run on load",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    torch.save({"module": {"w": torch.ones(2)}, "evil": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: refusing to unpickle"):
        safe_load(tmp_path / "bad.pt")
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.gradients, "t": torch.zeros(3)}, tmp_path / "ds.pt")
    assert safe_load(tmp_path / "ds.pt")["zero_stage"] == ZeroStageEnum.gradients  # DeepSpeed's own: allowed


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(safe_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
