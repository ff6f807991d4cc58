"""Upcycling moma_1t1i -> moma_4t4i (MoMa §4.5) and the router noise that goes with it.

* the upcycled model computes the 1t1i model's function: the first-step loss and logits on the same
  batch are equal (noise off, capacity factor 1), on one process and under expert parallel 2 on 2
  gloo ranks through the training engine;
* `moma upcycle` + `train init_from=` under the deepspeed launcher: the run sees exactly the
  documents the 1t1i run would have seen next, with a fresh LR schedule;
* Gumbel-sigmoid noise only while training; exact ties split round robin;
* bad input (not a 1t1i checkpoint, a target without groups or without its MoD layers, another
  model in init_from, noise where there is no expert-choice router) refused before launch.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_fixtures import run_distributed_test
from launch_fixtures import REPO, cpu_env, run_deepspeed
from training_fixtures import make_training_data, run_config, write_config

from moma.pipeline.model.config import preset
from moma.pipeline.model.routing import _expert_ranking
from moma.pipeline.training.config import load_config
from moma.pipeline.training.engine import build_model
from moma.pipeline.training.export import export_checkpoint, load_exported
from moma.pipeline.training.metrics import read_metrics
from moma.pipeline.training.train import lr_lambda
from moma.pipeline.training.upcycle import UpcycleError, upcycle_state, upcycled_config

TRAIN = ["--module", "moma.pipeline.cli", "train"]
SMALL = dict(d_model=64, n_layers=2, n_heads=2, ffn_hidden=96)


def split_batch(vocab_size: int, image_offset: int, seed: int, rows: int = 2, seq: int = 33) -> torch.Tensor:
    """Rows of 16 text then 17 image tokens: 32 text and 32 image inputs per micro-batch, counts
    that divide by 4 experts (so expert choice at capacity factor 1 has no ceil() overlap)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (rows, seq), generator=g)  # plain text ranks, far below the specials
    ids[:, 16:] = torch.randint(image_offset, vocab_size, (rows, seq - 16), generator=g)
    return ids


def mixed_model(ffn: str, **kw: object):
    # n_layers as given (2), also for _mod variants: these tests are about the function, not FLOPs matching
    return preset("tiny", ffn=ffn, vocab_size=320, image_offset=256, match_mod_depth=False, **{**SMALL, **kw})


# --- on one process ----------------------------------------------------------------------------------

MODES = [("sigmoid", "topk"), ("softmax", "topk"), ("softmax", "balanced"), ("sigmoid", "balanced")]


@pytest.mark.parametrize(("rank", "assign"), MODES)
@pytest.mark.parametrize(("source", "target", "seq"), [("moma_1t1i", "moma_4t4i", 33), ("moma_1t1i", "moma_2t4i", 33),
                                                        ("moma_1t1i_mod", "moma_4t4i_mod", 33),
                                                        ("moma_1t1i", "moma_4t4i", 30)])
def test_upcycled_model_has_the_1t1i_function(source: str, target: str, seq: int, rank: str, assign: str) -> None:
    """In every routing mode where the zero router's ties split the tokens once each. With counts
    that do not divide by the experts (seq 30: 32 text, 26 image inputs over 4 experts) top-k's
    ceil() gives the remainder to two copies, so there only `balanced` is exact."""
    if seq != 33 and assign == "topk":
        pytest.skip("top-k at capacity factor 1 takes ceil(b/E) per expert: the remainder goes to two copies")
    src_cfg = mixed_model(source)
    src = build_model(src_cfg, seed=3)
    state = {k: v.detach().clone() for k, v in src.state_dict().items()}
    dst_cfg = dataclasses.replace(upcycled_config(src_cfg, target), router_rank=rank, router_assign=assign)
    dst = build_model(dst_cfg, seed=4)
    dst.load_state_dict(upcycle_state(state, dst_cfg), strict=True)
    ids = split_batch(320, 256, seed=0, seq=seq)
    src.train(), dst.train()
    with torch.no_grad():
        la, lb = src(ids[:, :-1]).logits, dst(ids[:, :-1]).logits
    assert torch.allclose(la, lb, atol=1e-5), float((la - lb).abs().max())
    a, b = src(ids[:, :-1], ids[:, 1:]), dst(ids[:, :-1], ids[:, 1:])
    assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * a.loss.item()
    # and it is a real 4-expert model: one training step later the copies differ
    b.loss.backward()
    grads = [p.grad for n, p in dst.named_parameters() if "text_moe" in n and n.endswith("0.w1.weight")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_exact_ties_split_round_robin_and_distinct_scores_are_topk() -> None:
    tied = torch.zeros(12, 4)
    _, tokens = _expert_ranking(tied, 3)
    assert sorted(tokens.flatten().tolist()) == list(range(12))  # every token exactly once
    scores = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    values, tokens = _expert_ranking(scores, 7)
    ref_v, ref_t = scores.topk(7, dim=0)
    assert torch.equal(tokens, ref_t) and torch.equal(values, ref_v)


def test_router_noise_only_while_training() -> None:
    cfg = mixed_model("moma_4t4i", router_noise=1.0)
    model = build_model(cfg, seed=0)
    quiet = build_model(mixed_model("moma_4t4i"), seed=0)
    ids = split_batch(320, 256, seed=1)
    model.eval(), quiet.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, quiet(ids).logits)  # off at eval
        model.train()
        torch.manual_seed(0)
        first = model(ids).logits
        second = model(ids).logits
    assert not torch.equal(first, second)  # fresh noise each forward while training


def test_bad_settings_are_refused() -> None:
    src = mixed_model("moma_1t1i")
    with pytest.raises(UpcycleError, match="starts from moma_1t1i"):
        upcycled_config(mixed_model("moma_4t4i"), "moma_8t8i")
    with pytest.raises(UpcycleError, match="starts from moma_1t1i"):
        upcycled_config(mixed_model("dense"), "moma_4t4i")
    for target in ("dense", "moma_1t1i", "moe_8x"):
        with pytest.raises(UpcycleError, match="must be moma_<N>t<M>i"):
            upcycled_config(src, target)
    with pytest.raises(UpcycleError, match="use moma_4t4i_mod"):
        upcycled_config(mixed_model("moma_1t1i_mod"), "moma_4t4i")
    with pytest.raises(UpcycleError, match="has no mixture-of-depths"):
        upcycled_config(src, "moma_4t4i_mod")
    with pytest.raises(ValueError, match="unknown FFN variant"):
        upcycled_config(src, "moma_4x4")
    with pytest.raises(ValueError, match="router_noise applies to expert-choice"):
        mixed_model("dense", router_noise=1.0)
    with pytest.raises(ValueError, match="router_noise must be >= 0"):
        mixed_model("moma_4t4i", router_noise=-1.0)
    with pytest.raises(ValueError, match="needs at least one mixture-of-depths layer"):
        mixed_model("moma_4t4i_mod", n_layers=0)


# --- for real: the launcher, checkpoints, 2 gloo ranks --------------------------------------------------

def moma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moma.pipeline.cli", *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A moma_1t1i run to step 4 (checkpoint), upcycled to moma_4t4i; then the 1t1i run continued to
    step 8 and the upcycled run trained 4 steps from the same data position."""
    d = tmp_path_factory.mktemp("up")
    data = make_training_data(d / "data")
    one = write_config(run_config(data, d / "m1", max_steps=8, model__ffn="moma_1t1i", parallel__ep_size=1,
                                  parallel__ds_config="zero1_fp32"), d / "m1.yaml")
    run_deepspeed([*TRAIN, str(one), "stop_at_step=4", "--resume", "auto"], log=d / "m1.log")
    up = moma("upcycle", "--from", str(d / "m1" / "checkpoints"), "--to", "moma_4t4i", "--out", str(d / "up"))
    assert up.returncode == 0, up.stderr
    export_checkpoint(d / "m1" / "checkpoints", d / "m1_export")  # the step-4 model, for reference
    run_deepspeed([*TRAIN, str(one), "--resume", "auto"], log=d / "m1b.log")  # 1t1i steps 5-8
    four = write_config(run_config(data, d / "m4", max_steps=4, init_from=str(d / "up"),
                                   model__overrides__router_noise=1.0), d / "m4.yaml")
    run_deepspeed([*TRAIN, str(four), "--resume", "auto"], log=d / "m4.log")
    return {"dir": d, "m1": d / "m1", "m4": d / "m4", "up": d / "up", "m4_config": four, "m1_export": d / "m1_export"}


def engine_forward(config: Path, overrides: list[str], seed: int) -> dict[str, torch.Tensor | float]:
    """On every rank: the training engine built by `moma train`'s own setup (init_from applied), one
    forward in training mode on this rank's share of a fixed batch."""
    from moma.pipeline.training.config import load_config
    from moma.pipeline.training.engine import routing_for
    from moma.pipeline.training.train import setup_engine

    cfg = load_config(str(config), overrides)
    plan, info, engine, _ = setup_engine(cfg)
    ids = split_batch(plan.model.vocab_size, plan.model.image_offset, seed=seed + info.rank)
    engine.train()
    routing = routing_for(engine.module, ids[:, :-1])
    with torch.no_grad():
        logits = engine(ids[:, :-1], routing=routing).logits
        out = engine(ids[:, :-1], ids[:, 1:], routing=routing)
    return {"ids": ids, "logits": logits, "ce": float(sum(out.ce_sum.values())),
            "tokens": float(sum(out.tokens.values()))}


@pytest.mark.distributed
@pytest.mark.slow
def test_upcycled_first_step_loss_equals_1t1i_under_expert_parallel_2(runs: dict[str, Path]) -> None:
    results = run_distributed_test(engine_forward, world_size=2,
                                   func_args=(runs["m4_config"], ["model.overrides.router_noise=0.0"], 5))
    ref = load_exported(runs["m1_export"])
    ce = tokens = ref_ce = 0.0
    for rec in results:
        ids = rec["ids"]
        with torch.no_grad():
            logits, out = ref(ids[:, :-1]).logits, ref(ids[:, :-1], ids[:, 1:])
        assert torch.allclose(logits, rec["logits"], atol=1e-5), float((logits - rec["logits"]).abs().max())
        ce, tokens, ref_ce = ce + rec["ce"], tokens + rec["tokens"], ref_ce + float(sum(out.ce_sum.values()))
    assert abs(ce / tokens - ref_ce / tokens) <= 1e-6 * ref_ce / tokens


@pytest.mark.distributed
@pytest.mark.slow
def test_training_after_upcycling_continues_the_data_with_a_fresh_schedule(runs: dict[str, Path]) -> None:
    one, four = read_metrics(runs["m1"]), read_metrics(runs["m4"])
    assert [r["step"] for r in four] == [1, 2, 3, 4]
    # the documents the 1t1i run took at steps 5-8 are the upcycled run's steps 1-4, in order
    assert [r["docs_digest"] for r in one[4:8]] == [r["docs_digest"] for r in four]
    cfg = load_config(str(runs["m4_config"]))
    fresh = [cfg.optim.lr * lr_lambda(cfg)(step) for step in range(1, 5)]  # what a new run logs
    assert [r["lr"] for r in four] == pytest.approx(fresh)
    assert [r["lr"] for r in four] != pytest.approx([r["lr"] for r in one[4:8]])  # not 1t1i's schedule
    info = json.loads((runs["up"] / "export.json").read_text())
    assert info["step"] == 4 and info["upcycled"]["from"] == "moma_1t1i"
    assert json.loads((runs["up"] / "config.json").read_text())["moma"]["ffn"] == "moma_4t4i"  # HF-style
    log = (runs["dir"] / "m4.log").read_text()
    assert "starting from" in log and "data position" in log


@pytest.mark.distributed
@pytest.mark.slow
def test_bad_upcycling_input_is_refused_before_launch(runs: dict[str, Path], tmp_path: Path) -> None:
    bad = moma("upcycle", "--from", str(runs["m4"] / "checkpoints"), "--to", "moma_8t8i", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "starts from moma_1t1i" in bad.stderr and "moma_4t4i" in bad.stderr
    assert not (tmp_path / "x").exists()
    bad = moma("upcycle", "--from", str(runs["m1"] / "checkpoints"), "--to", "dense", "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "must be moma_<N>t<M>i" in bad.stderr
    bad = moma("upcycle", "--from", str(tmp_path / "nothing"), "--to", "moma_4t4i", "--out", str(tmp_path / "z"))
    assert bad.returncode == 2 and "--from" in bad.stderr and "no checkpoint" in bad.stderr
    # a run whose model is not the upcycled one, or a directory that is no model
    check = moma("train", str(runs["m4_config"]), "model.overrides.d_model=32", "--check", "--world-size", "2")
    assert check.returncode == 2 and "init_from" in check.stderr and "d_model" in check.stderr
    check = moma("train", str(runs["m4_config"]), f"init_from={tmp_path}", "--check", "--world-size", "2")
    assert check.returncode == 2 and "is not a model directory" in check.stderr
    check = moma("train", str(runs["m4_config"]), "model.ffn=moma_8t8i", "--check", "--world-size", "2")
    assert check.returncode == 2 and "ffn" in check.stderr
    # a group count the expert-parallel size does not divide: upcycled fine, refused before launch
    three = moma("upcycle", "--from", str(runs["m1"] / "checkpoints"), "--to", "moma_3t4i", "--out",
                 str(tmp_path / "three"))
    assert three.returncode == 0, three.stderr
    check = moma("train", str(runs["m4_config"]), "model.ffn=moma_3t4i", f"init_from={tmp_path / 'three'}",
                 "--check", "--world-size", "2")
    assert check.returncode == 2 and "3" in check.stderr and "expert-parallel" in check.stderr, check.stderr


def test_router_noise_defaults_on_when_continuing_from_an_upcycled_model(runs: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """The paper (§2.5) trains an upcycled model with router noise: on unless the run sets it; only
    for `moma upcycle`'s output (a plain export gets none)."""
    import yaml

    from moma.pipeline.training.run_plan import UPCYCLED_ROUTER_NOISE, model_config, run_vocab

    tree = yaml.safe_load(runs["m4_config"].read_text())
    del tree["model"]["overrides"]["router_noise"]
    path = write_config(tree, tmp_path / "m4_default.yaml")

    def noise(*overrides: str) -> float:
        cfg = load_config(str(path), list(overrides))
        return model_config(cfg, run_vocab(cfg)).router_noise

    assert noise() == UPCYCLED_ROUTER_NOISE == 1.0
    assert noise("model.overrides.router_noise=0") == 0.0  # the user's choice wins
    assert noise("model.overrides.router_noise=0.5") == 0.5
    assert noise("model.overrides.moe_dispatch=deepspeed") == 0.0  # no noise where it does not apply
    assert noise(f"init_from={runs['m1_export']}", "model.ffn=moma_1t1i") == 0.0  # not an upcycled model
