"""Checkpoint bookkeeping that must survive rollbacks, kills and hostile files: write order, `latest`,
tag reuse, safe loading, RNG states, `latest` pointing outside, checksums (a flipped bit in a tensor).
(The distributed save/resume paths: test_training_distributed.py, test_signals.py.)

    .venv/bin/python -m pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moma.pipeline.training.checkpoint import (
    COMPLETE,
    LATEST,
    CheckpointError,
    _share,
    checkpoints,
    file_checksums,
    find_checkpoint,
    mark_complete,
    new_tag,
    rng_state,
    safe_load,
    set_rng_state,
)


def save(ckpt: Path, step: int, keep: int = 0) -> str:
    """What a save does, minus DeepSpeed: a fresh tag, its files (a tensor file, a rank's state),
    then `complete` with every file's checksum, and `latest`."""
    tag = new_tag(ckpt, step)
    (ckpt / tag / "client").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(4096, dtype=torch.float32) + step}},
               ckpt / tag / "mp_rank_00_model_states.pt")
    torch.save({"loader": {"consumed": step}}, ckpt / tag / "client" / "rank00000.pt")
    mark_complete(ckpt, tag, {"step": step, "files": file_checksums(ckpt / tag)}, keep)
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


@pytest.mark.parametrize("target", ["../elsewhere/global_step9", "ABS", "..", "link"])
def test_latest_naming_a_directory_outside_the_folder_is_refused(tmp_path: Path, target: str) -> None:
    """Old code: `latest` -> ../elsewhere/global_step9 (a complete checkpoint of another run) was
    followed and resumed from."""
    ckpt, elsewhere = tmp_path / "run" / "ckpt", tmp_path / "run" / "elsewhere"
    save(ckpt, 4)
    save(elsewhere, 9)
    if target == "ABS":
        target = str(elsewhere / "global_step9")
    elif target == "link":
        (ckpt / "global_step12").symlink_to(elsewhere / "global_step9")
        target = "global_step12"
    (ckpt / LATEST).write_text(target)
    for resume in ("auto", str(ckpt)):
        with pytest.raises(CheckpointError, match=rf"latest names '{re.escape(target)}'.*refusing it"):
            find_checkpoint(resume, ckpt)
    (ckpt / LATEST).write_text("global_step4")
    assert find_checkpoint("auto", ckpt) == (ckpt, "global_step4")  # the link is no checkpoint of this run
    assert [t for t, _ in checkpoints(ckpt)] == ["global_step4"]


def flip_a_bit_inside_the_tensor(path: Path, step: int) -> None:
    data = path.read_bytes()
    values = (torch.arange(4096, dtype=torch.float32) + step).numpy().tobytes()
    at = data.index(values[8000:8064]) + 40  # inside the tensor's bytes (stored, not compressed)
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])


def test_a_flipped_bit_in_a_tensor_refuses_the_checkpoint_naming_the_file(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    save(tmp_path, 100)
    tag = save(tmp_path, 200)
    damaged = tmp_path / tag / "mp_rank_00_model_states.pt"
    flip_a_bit_inside_the_tensor(damaged, 200)
    # what the old code did: torch.load does not check the zip's CRCs, the damaged tensor loads silently
    w = safe_load(damaged)["module"]["w"]
    assert int((w != torch.arange(4096, dtype=torch.float32) + 200).sum()) == 1
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(damaged))}: crc32 [0-9a-f]+, complete records"):
        find_checkpoint(str(tmp_path / tag), tmp_path)
    # auto: the previous complete one, with a warning naming the file
    assert find_checkpoint("auto", tmp_path) == (tmp_path, "global_step100")
    out = capsys.readouterr().out
    assert "warning:" in out and str(damaged) in out and "newest intact complete checkpoint" in out
    # a file that went missing or changed size: named too; nothing intact left: an error, not a fresh start
    (tmp_path / "global_step100" / "client" / "rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint.*rank00000\.pt: No such file"):
        find_checkpoint("auto", tmp_path)
    assert find_checkpoint("auto", tmp_path, verify=False) == (tmp_path, tag)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 10**9), max_size=40), world=st.integers(1, 9))
def test_checksum_shares_cover_every_file_once(sizes: list[int], world: int) -> None:
    files = [(f"f{i}", s) for i, s in enumerate(sizes)]
    shares = [_share(files, r, world) for r in range(world)]
    assert sorted(n for share in shares for n in share) == sorted(n for n, _ in files)
    biggest = max(sizes, default=0)
    loads = [sum(dict(files)[n] for n in share) for share in shares]
    assert max(loads, default=0) - min(loads, default=0) <= biggest  # greedy: within one file of even
