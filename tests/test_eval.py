"""The same held-out numbers everywhere: `moma eval` reads the run's data settings and micro-batch
(from the checkpoint or the export), its default set is every held-out document exactly once, and
bad requests are refused instead of cycling or printing null.

    .venv/bin/python -m pytest tests/test_eval.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from launch_fixtures import run_single
from training_fixtures import make_training_data, run_config, write_config

from moma.pipeline.cli import main as cli_main
from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader
from moma.pipeline.shards.manifest import Manifest
from moma.pipeline.training import evaluate as ev


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


def _totals(dirs: list[Path]) -> tuple[int, int]:
    shards = [s for d in dirs for s in Manifest.load(d).shards]
    return sum(s.docs for s in shards), sum(s.text_tokens + s.image_tokens for s in shards)


def _one_pass(data: DataConfig, sources: tuple[DataSource, ...], batch_size: int) -> tuple[int, int, int]:
    """Walk the held-out set as heldout_batches does: (batches, first-pass tokens, first-pass <|bos|>)."""
    cfg = DataConfig(**{**data.__dict__, "sources": sources, "num_workers": 0})
    loader = PackedLoader(cfg, batch_size, seed=ev.EVAL_SEED)
    one = ev._OnePass(batch_size, loader.vocab, len(sources))
    n = tokens = bos = 0
    for batch in loader:
        labels = one.labels(batch)
        window = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
        assert np.array_equal(labels.numpy() != -100, one.counted[:, 1:] & (batch["labels"].numpy() != -100))
        tokens += int(one.counted.sum())
        bos += int((window[one.counted] == loader.vocab.bos_id).sum())
        n += 1
        if one.done:
            return n, tokens, bos
    raise AssertionError("unreachable")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 5), seq_len=st.sampled_from([8, 17, 32, 64]), shuffle=st.integers(1, 50),
       keep_whole=st.booleans(), open_shards=st.integers(1, 3), two=st.booleans())
def test_the_whole_set_holds_every_document_exactly_once(data: dict[str, Path], batch_size: int, seq_len: int,
                                                         shuffle: int, keep_whole: bool, open_shards: int,
                                                         two: bool) -> None:
    dirs = [data["captions"], data["books"]] if two else [data["captions"]]
    sources = tuple(DataSource(str(d)) for d in dirs)
    cfg = DataConfig(seq_len=seq_len, shuffle_buffer=shuffle, keep_images_whole=keep_whole, open_shards=open_shards)
    n, tokens, bos = _one_pass(cfg, sources, batch_size)
    docs, total = _totals(dirs)
    # every token of every document counted once (window starts included), every document started once
    assert (tokens, bos) == (total, docs)
    got = ev.heldout_batches(cfg, sources, None, batch_size)
    assert len(got) == n
    assert len(ev.heldout_batches(cfg, sources, None, batch_size, batches=n + 5)) == n  # never cycled
    first = ev.heldout_batches(cfg, sources, None, batch_size, batches=1)
    assert len(first) == 1


def test_zero_batches_are_refused(data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["eval", "x", "--data", str(data["books"]), "--batches", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=">= 1"):
        ev.heldout_batches(DataConfig(), (DataSource(str(data["books"])),), None, 2, batches=0)


@pytest.mark.slow
def test_moma_eval_equals_training_with_the_runs_own_data_settings(data: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A run with non-default data settings (seq_len, shuffle buffer, open shards, keep_images_whole,
    micro-batch 3) evaluates the whole held-out set at its end; `moma eval` of its checkpoint and of
    its export, with no data options, prints the same figures (1e-6) over the same tokens."""
    cfg = run_config(data, tmp_path / "run", max_steps=2, eval__every=2, eval__batches=100000,
                     data__seq_len=40, data__shuffle_buffer=3, data__open_shards=2, data__keep_images_whole=True,
                     parallel__ep_size=1, parallel__micro_batch=3, checkpoint__every=2)
    cfg["data"]["eval_sources"] = [{"path": str(data["captions"])}]
    run_single(["-m", "moma.pipeline.cli", "train", str(write_config(cfg, tmp_path / "run.yaml"))],
               log=tmp_path / "log")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["eval"] for r in rows if "eval" in r][-1]
    ckpt = tmp_path / "run" / "checkpoints"
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    for model in (ckpt, tmp_path / "export"):
        assert cli_main(["eval", str(model), "--data", str(data["captions"])]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (got["seq_len"], got["batch_size"], got["whole_set"]) == (40, 3, True)
        for key in ("loss", "loss_text", "loss_image"):
            assert abs(got[key] - trained[key]) < 1e-6, (model, key, got[key], trained[key])
        assert (got["tokens_text"], got["tokens_image"], got["batches"]) == \
            (trained["tokens_text"], trained["tokens_image"], trained["batches"])
        # routing health over the whole set: per MoE layer and group, shares of tokens by 0 / 1 / 2+ experts
        health = got["routing_health"]
        assert sorted(health) == [f"{i}.{g}" for i in range(2) for g in ("image", "text")]
        assert all(abs(sum(v.values()) - 1) < 1e-3 for v in health.values())
    # the first N batches on request; more than the set holds: the set once, with a warning
    assert cli_main(["eval", str(tmp_path / "export"), "--data", str(data["captions"]), "--batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["batches"] == 2
    assert cli_main(["eval", str(tmp_path / "export"), "--data", str(data["captions"]), "--batches", "100000"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["batches"] == trained["batches"]
    assert "evaluating those once" in caplog.text


def test_moma_plot_draws_the_heldout_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from moma.pipeline.training.metrics import read_eval_rows

    rows = [{"step": s, "loss": 3.0 - s / 10, "loss_text": 2.0, "loss_image": 4.0, "lr": 1e-3} for s in (1, 2, 3, 4)]
    rows += [{"step": s, "eval": {"loss": 3.0 - s / 5, "loss_text": 2.5, "loss_image": 3.5},
              "eval_causal": {"loss": 3.2 - s / 5, "loss_text": 2.6, "loss_image": None}} for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in read_eval_rows(tmp_path)] == [2, 4]
    assert cli_main(["plot", str(tmp_path)]) == 0
    assert "heldout.png" in capsys.readouterr().out
    assert Image.open(tmp_path / "plots" / "heldout.png").size[0] > 300
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp_path / "plots" / "heldout.png").unlink()
    assert cli_main(["plot", str(tmp_path)]) == 0 and not (tmp_path / "plots" / "heldout.png").exists()


def test_an_auxiliary_router_fit_logs_the_causal_figure_first() -> None:
    """The frozen model's expert-choice loss is the same at every evaluation of a fit: the line leads
    with the causal loss and the routers' precision / recall (before: only the expert-choice figure)."""
    ec = {"loss": 2.0, "loss_text": 1.0, "loss_image": 3.0}
    causal = {"loss": 2.5, "loss_text": 1.5, "loss_image": None}
    routers = {"0.text": {"precision": 0.9, "recall": 0.6}, "0.image": {"precision": 0.7, "recall": 0.4}}
    assert ev.progress_line(8, {"eval": ec}) == "step 8: held-out loss 2.0000 (text 1.0000, image 3.0000)"
    assert ev.progress_line(8, {"eval": ec, "eval_causal": causal, "eval_aux_routers": routers}) == (
        "step 8: held-out loss, causal routing 2.5000 (text 1.5000, image -); auxiliary routers vs expert choice: "
        "precision 0.800, recall 0.500 (mean of 2 layer groups); frozen model, expert choice 2.0000 "
        "(text 1.0000, image 3.0000)")
