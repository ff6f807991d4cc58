"""`moma train` for real: the deepspeed launcher, 2 gloo ranks, ZeRO-2, expert parallel 2, fp32.

* 2N steps uninterrupted vs N steps, SIGKILL, resume to 2N: equal per-step losses, same documents;
* resume on another layout (1 rank, expert parallel 1) through the universal copy: every parameter
  and Adam moment restored exactly, training and the data stream go on;
* export: consolidated safetensors, reloaded on one process, gives the training engine's logits;
* non-finite losses skipped and counted; too many in a row checkpoint and stop;
* SIGTERM (preemption) to the ranks: checkpoint, exit 0, resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from dist_fixtures import run_distributed_test
from launch_fixtures import REPO, VENV_BIN, cpu_env, free_port, run_deepspeed, run_single
from training_fixtures import make_training_data, run_config, write_config

from moma.pipeline.training.export import export_checkpoint, load_exported
from moma.pipeline.training.metrics import read_metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
N = 4
TRAIN = ["--module", "moma.pipeline.cli", "train"]


def fixed_batches(vocab_size: int, image_offset: int, n: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99 + seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, image_offset, (2, seq), generator=g)
        ids[:, 4 + i:20 + i] = torch.randint(image_offset, vocab_size, (2, 16), generator=g)
        out.append(ids)
    return out


def probe_checkpoint(config: Path, checkpoint: Path, overrides: list[str] = (), logits: bool = False,
                     universal: Path | None = None) -> dict[str, torch.Tensor] | None:
    """On every rank: load a `moma train` checkpoint into a freshly built engine (any layout), then
    return the engine's logits on fixed batches, and/or write the universal copy of what was loaded."""
    from moma.pipeline.training.checkpoint import find_checkpoint, save_universal
    from moma.pipeline.training.config import load_config
    from moma.pipeline.training.engine import routing_for
    from moma.pipeline.training.train import resume_from, setup_engine

    cfg = load_config(str(config), list(overrides))
    plan, info, engine, ep_rank = setup_engine(cfg)
    resume_from(engine, plan, find_checkpoint(str(checkpoint), cfg.checkpoint_dir), ep_rank, info.rank)
    if universal is not None:
        from deepspeed.utils import groups

        from moma.pipeline.training.engine import expert_group_name

        edp = groups._get_expert_data_parallel_rank(expert_group_name(cfg.parallel.ep_size))
        save_universal(engine, Path(universal), ep_rank, edp)
    if not logits:
        return None
    engine.eval()
    batches = fixed_batches(plan.model.vocab_size, plan.model.image_offset, plan.world_size, cfg.data.seq_len)
    with torch.no_grad():
        ids = batches[info.rank]
        return {"ids": ids, "logits": engine(ids, routing=routing_for(engine.module, ids)).logits}


def continue_training(config: Path, checkpoint: Path, overrides: list[str] = (), steps: int = 3) -> list[float]:
    """On every rank: load a checkpoint (any layout), then take `steps` optimizer steps on fixed global
    batches of 2 micro-batches (split over the ranks; one rank takes both through accumulation), and
    return each step's cross-entropy over the whole global batch."""
    import torch.distributed as dist

    from moma.pipeline.training.checkpoint import find_checkpoint
    from moma.pipeline.training.config import load_config
    from moma.pipeline.training.engine import routing_for
    from moma.pipeline.training.train import resume_from, setup_engine

    cfg = load_config(str(config), list(overrides))
    plan, info, engine, ep_rank = setup_engine(cfg)
    resume_from(engine, plan, find_checkpoint(str(checkpoint), cfg.checkpoint_dir), ep_rank, info.rank)
    losses = []
    for step in range(steps):
        micro = fixed_batches(plan.model.vocab_size, plan.model.image_offset, 2, cfg.data.seq_len + 1, seed=step)
        ce, tokens = 0.0, 0.0
        for ids in micro[info.rank::plan.world_size]:
            out = engine(ids[:, :-1], ids[:, 1:], routing=routing_for(engine.module, ids[:, :-1]))
            engine.backward(out.loss)
            engine.step()
            ce += float(sum(out.ce_sum.values()))
            tokens += float(sum(out.tokens.values()))
        total = torch.tensor([ce, tokens], dtype=torch.float64)
        dist.all_reduce(total)
        losses.append(float(total[0] / total[1]))
    return losses


def launch_cmd(config: Path, *extra: str) -> list[str]:
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *TRAIN, str(config),
            *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("a")
    config = write_config(run_config(data, d / "run", max_steps=2 * N), d / "run.yaml")
    run_deepspeed([*TRAIN, str(config), "--resume", "auto"], log=d / "log")
    return d


def test_sigkill_then_resume_continues_exactly(uninterrupted: Path, data: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run", max_steps=2 * N), tmp_path / "run.yaml")
    latest = tmp_path / "run" / "checkpoints" / "latest"
    proc = subprocess.Popen(launch_cmd(config, "--resume", "auto"), cwd=REPO, env=cpu_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text() == f"global_step{N}":
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, with no chance to clean up
    proc.wait()
    run_deepspeed([*TRAIN, str(config), "--resume", "auto"], log=tmp_path / "log2")

    a, b = read_metrics(uninterrupted / "run"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * N + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_text", "loss_image"):  # None: no target of that modality in the step
            same = ra[key] == rb[key] or (None not in (ra[key], rb[key]) and abs(ra[key] - rb[key]) <= 1e-6)
            assert same, (ra["step"], key, ra[key], rb[key])
        assert ra["docs_digest"] == rb["docs_digest"], ra["step"]  # the same documents, step by step
    assert b[-1]["tokens_seen"] == a[-1]["tokens_seen"]


def test_sigkill_during_a_save_resumes_from_the_last_complete_one(uninterrupted: Path, data: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """Killed while a checkpoint is being written (its directory there, `complete` not yet): the rerun
    resumes from the one before, and every step sees the same documents as an uninterrupted run."""
    config = write_config(run_config(data, tmp_path / "run", max_steps=2 * N, checkpoint__every=2),
                          tmp_path / "run.yaml")
    ckpt = tmp_path / "run" / "checkpoints"
    proc = subprocess.Popen(launch_cmd(config, "--resume", "auto"), cwd=REPO, env=cpu_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut, deadline = None, time.time() + 300
    while cut is None and time.time() < deadline and proc.poll() is None:
        if (ckpt / "latest").exists():  # one complete checkpoint; now catch the next one half-written
            cut = next((d.name for d in ckpt.glob("global_step*") if d.is_dir() and not (d / "complete").exists()),
                       None)
        if cut is None:
            time.sleep(0.001)
    assert cut is not None and proc.poll() is None, "no save could be caught in progress"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt / cut / "complete").exists()
    run_deepspeed([*TRAIN, str(config), "--resume", "auto"], log=tmp_path / "log2")
    a, b = read_metrics(uninterrupted / "run"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in b] == list(range(1, 2 * N + 1))
    for ra, rb in zip(a, b):
        assert ra["docs_digest"] == rb["docs_digest"] and abs(ra["loss"] - rb["loss"]) <= 1e-6, ra["step"]
    assert not (ckpt / cut).exists() or (ckpt / cut / "complete").exists()  # the cut save: cleaned or redone


def test_resume_with_another_worker_count_on_the_same_world_size(data: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run", max_steps=2 * N), tmp_path / "run.yaml")
    run_deepspeed([*TRAIN, str(config), f"stop_at_step={N}", "--resume", "auto"], log=tmp_path / "log1")
    proc = run_deepspeed([*TRAIN, str(config), "data.num_workers=2", "--resume", "auto"], log=tmp_path / "log2")
    assert "(same layout)" in proc.stdout + proc.stderr  # the engine's own path; the loader re-split
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 2 * N + 1))


def test_resume_on_another_layout_restores_everything(uninterrupted: Path, data: dict[str, Path],
                                                      tmp_path: Path) -> None:
    ckpt = uninterrupted / "run" / "checkpoints"
    one_rank = ["parallel.ep_size=1", "parallel.grad_accum=2"]
    # load the 2-rank / ep-2 checkpoint into a 1-rank / ep-1 engine and write back what it holds
    run_distributed_test(probe_checkpoint, world_size=1, func_args=(uninterrupted / "run.yaml", ckpt, one_rank),
                         func_kwargs={"universal": tmp_path / "reloaded"})
    saved = _merged(ckpt / f"global_step{2 * N}")
    reloaded = _merged(tmp_path / "reloaded")
    assert saved.keys() == reloaded.keys() and len(saved) > 10
    for name, entry in saved.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(entry[key], reloaded[name][key]), (name, key)
    # training goes on from there on one rank exactly as on the old layout: fed the same global
    # batches, the next steps' losses equal those of the 2-rank engine resumed through DeepSpeed's
    # own path (step 1 checks the weights; steps 2 and 3 the Adam moments, step count and LR)
    old = run_distributed_test(continue_training, world_size=2, func_args=(uninterrupted / "run.yaml", ckpt))
    new = run_distributed_test(continue_training, world_size=1, func_args=(uninterrupted / "run.yaml", ckpt, one_rank))
    assert old[0] == old[1] and len(new[0]) == 3
    assert max(abs(a - b) for a, b in zip(old[0], new[0])) < 1e-5, (old[0], new[0])
    assert new[0][2] < new[0][0]  # and it does learn: the same batches go down
    # and `moma train` goes on from there on one rank (the loader re-split)
    config = write_config(run_config(data, tmp_path / "run", max_steps=2 * N + 2), tmp_path / "run.yaml")
    import shutil

    shutil.copytree(ckpt, tmp_path / "run" / "checkpoints")
    proc = run_single(["-m", "moma.pipeline.cli", "train", str(config), *one_rank, "--resume", "auto"])
    assert "re-sharded from world 2 / ep 2 to world 1 / ep 1" in proc.stdout + proc.stderr
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows][-2:] == [2 * N + 1, 2 * N + 2]


def _merged(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint directory's universal copy, every tensor."""
    from moma.pipeline.training.checkpoint import read_universal

    return read_universal(directory)[0]


def test_export_reloads_to_the_engines_logits(uninterrupted: Path, tmp_path: Path) -> None:
    ckpt = uninterrupted / "run" / "checkpoints"
    records = run_distributed_test(probe_checkpoint, world_size=2, func_args=(uninterrupted / "run.yaml", ckpt),
                                   func_kwargs={"logits": True})
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "vocab.json"}
    model = load_exported(out)
    for rec in records:
        with torch.no_grad():
            mine = model(rec["ids"]).logits
        assert torch.allclose(mine, rec["logits"], atol=1e-5), float((mine - rec["logits"]).abs().max())
    experts = [k for k in json.loads((out / "export.json").read_text()) if k]
    assert experts  # export.json written


def test_nonfinite_losses_are_skipped_then_stop(data: dict[str, Path], tmp_path: Path) -> None:
    cfg = run_config(data, tmp_path / "run", max_steps=10, debug_nonfinite_at=[2, 5, 5, 5],
                     max_nonfinite_in_a_row=2)
    config = write_config(cfg, tmp_path / "run.yaml")
    with pytest.raises(AssertionError, match="exited"):
        run_deepspeed([*TRAIN, str(config), "--resume", "auto"], log=tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert "non-finite loss, micro-batch skipped" in log and "stopping: more than 2 non-finite losses" in log
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 4 and rows[1]["nonfinite_skipped"] == 1  # step 2 skipped a micro-batch, went on
    assert "(3 in a row, 4 in all)" in log  # step 5: the third in a row is one too many
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step4"


def test_sigterm_checkpoints_and_exits_zero(data: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(run_config(data, tmp_path / "run", max_steps=400, checkpoint__every=1000),
                          tmp_path / "r.yaml")
    proc = subprocess.Popen(launch_cmd(config, "--resume", "auto"), cwd=REPO, env=cpu_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)  # not their DataLoader workers
             if "moma.pipeline.cli" in " ".join(c.cmdline()) and "launcher.launch" in " ".join(c.parent().cmdline())]
    assert len(ranks) == 2
    for r in ranks:  # what SLURM / srun does at preemption: signal every task
        r.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preemption signal: checkpointed at step" in out
    tag = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("global_step"))
    assert 3 <= step < 400 and read_metrics(tmp_path / "run")[-1]["step"] == step


def test_heldout_evaluation_during_training_equals_moma_eval_of_the_checkpoint(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """eval.every on 2 ranks (ep 2) writes held-out losses by modality; `moma eval` of the final
    checkpoint, and of its export, on one process gives the same figures on the same fixed set."""
    from moma.pipeline.cli import main as cli_main

    cfg = run_config(data, tmp_path / "run", max_steps=N, eval__every=2, eval__batches=3)
    cfg["data"]["eval_sources"] = [{"path": str(data["books"])}]
    config = write_config(cfg, tmp_path / "run.yaml")
    run_deepspeed([*TRAIN, str(config)], log=tmp_path / "log")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"] for r in rows if "eval" in r}
    assert sorted(evals) == [2, 4] and evals[4]["batches"] == 3 and evals[4]["loss"] < evals[2]["loss"] + 1.0
    args = ["--data", str(data["books"]), "--batches", "3", "--batch-size", "2", "--seq-len", "32"]
    ckpt = tmp_path / "run" / "checkpoints"
    export_checkpoint(ckpt, tmp_path / "export")
    for model in (ckpt, tmp_path / "export"):
        assert cli_main(["eval", str(model), *args]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for key in ("loss", "loss_text"):
            assert abs(got[key] - evals[4][key]) < 1e-5, (model, key, got[key], evals[4][key])
        assert got["tokens_text"] == evals[4]["tokens_text"]
    # bad input: causal routing of a model without auxiliary routers, a clear error
    assert cli_main(["eval", str(tmp_path / "export"), "--data", str(data["captions"]), "--routing", "causal"]) == 2
    assert "no auxiliary routers" in capsys.readouterr().err


def test_train_aux_routers_under_the_launcher_with_expert_parallelism(uninterrupted: Path, data: dict[str, Path],
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """`moma train-aux-routers` on 2 ranks (ZeRO-2, ep 2): the main model stays exactly as trained,
    the routers' BCE falls, per layer and group precision/recall on held-out batches are written,
    it stops and resumes like `moma train`, and the export routes causally."""
    from moma.pipeline.cli import main as cli_main

    ckpt = uninterrupted / "run" / "checkpoints"
    out = tmp_path / "aux"
    cmd = ["--module", "moma.pipeline.cli", "train-aux-routers", "--from", str(ckpt), "--data", str(data["captions"]),
           "--eval-data", str(data["books"]), "--steps", "8", "--out", str(out), "optim.lr=0.01", "logging.every=1"]
    run_deepspeed([*cmd, "stop_at_step=4"], log=tmp_path / "log1")
    proc = run_deepspeed(cmd, log=tmp_path / "log2")
    assert "resumed from" in proc.stdout + proc.stderr and "at step 4 (same layout)" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "aux_router_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert train_rows[-1]["aux_router_loss"] < train_rows[0]["aux_router_loss"]
    held = [r["eval_aux_routers"] for r in rows if "eval_aux_routers" in r][-1]
    assert sorted(held) == ["0.image", "0.text", "1.image", "1.text"]
    assert all({"accuracy", "precision", "recall"} <= set(v) for v in held.values())
    # the frozen main model: every pre-trained tensor unchanged; the routers new
    before = export_checkpoint(ckpt, tmp_path / "e0")
    after = export_checkpoint(out / "checkpoints", tmp_path / "e1")
    from safetensors.torch import load_file

    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    assert set(b) - set(a) and all("causal_routers" in k for k in set(b) - set(a))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # causal routing under expert parallelism during the fit equals `moma eval --routing causal` of the export
    causal = [r for r in rows if "eval_causal" in r][-1]
    assert causal["step"] == 8
    assert cli_main(["eval", str(after), "--data", str(data["books"]), "--routing", "causal", "--batches", "8",
                     "--batch-size", "2", "--seq-len", "32"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(got["loss"] - causal["eval_causal"]["loss"]) < 1e-5, (got, causal)


def test_aux_routers_for_another_model_are_refused_before_launch(uninterrupted: Path, data: dict[str, Path],
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from moma.pipeline.cli import main as cli_main

    ckpt = uninterrupted / "run" / "checkpoints"
    assert cli_main(["train-aux-routers", "--from", str(ckpt), "--data", str(data["captions"]), "--steps", "2",
                     "--out", str(tmp_path / "aux"), "model.overrides.n_layers=3"]) == 2
    err = capsys.readouterr().err
    assert "aux_routers_from" in err and "holds another model (n_layers: 2 there, 3 here)" in err
    assert cli_main(["train-aux-routers", "--from", str(tmp_path / "nowhere"), "--data", str(data["captions"]),
                     "--steps", "2"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "aux").exists()
