"""`moma experiment flops-savings`: placing variants on dense's loss-vs-FLOPs curve, and the whole
command at the smoke scale under the deepspeed launcher (machinery, not numbers): every run, the
report and the plots, nothing redone on a rerun, a lost result recovered from the run itself, bad
input refused before the first launch.

    .venv/bin/python -m pytest tests/test_flops_savings.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from training_fixtures import make_training_data

from moma.pipeline.config_parsing import ConfigError
from moma.pipeline.experiments.flops_savings import (
    SCALES,
    VARIANTS,
    ExperimentInputs,
    RunSpec,
    analyse,
    check_runs,
    dense_flops_to_reach,
    plan_runs,
    run_experiment,
    run_tree,
)
from moma.pipeline.loader.loader import DataSource
from moma.pipeline.model.accounting import count
from moma.pipeline.model.config import preset

CURVE = [(1e12, 3.0), (2e12, 2.6), (4e12, 2.3), (8e12, 2.1)]


def test_a_dense_point_is_reached_at_its_own_flops_and_between_points_monotonically() -> None:
    for flops, loss in CURVE:
        reach, extrapolated = dense_flops_to_reach(CURVE, loss)
        assert reach == pytest.approx(flops) and not extrapolated
    losses = [2.95, 2.8, 2.61, 2.5, 2.31, 2.2, 2.11]
    reached = [dense_flops_to_reach(CURVE, x)[0] for x in losses]
    assert reached == sorted(reached)  # lower loss needs more dense FLOPs
    assert all(1e12 < r < 8e12 for r in reached)


def test_beyond_the_curve_is_flagged_and_a_flat_end_gives_no_estimate() -> None:
    reach, extrapolated = dense_flops_to_reach(CURVE, 2.0)
    assert extrapolated and reach > 8e12
    reach, extrapolated = dense_flops_to_reach(CURVE, 3.2)
    assert extrapolated and reach < 1e12
    flat_end = [(1e12, 3.0), (2e12, 2.6), (4e12, 2.6)]
    assert dense_flops_to_reach(flat_end, 2.5) == (None, True)


def fake_results(losses: dict[tuple[str, float], list[float]], steps: int = 100) -> tuple[dict, list, dict]:
    """Results as runs leave them: the same loss for every modality, 1,000 text + 1,000 image tokens
    per step."""
    runs, results, models = [], {}, {}
    for (variant, mult), per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            run = RunSpec(variant, mult, seed, round(steps * mult))
            runs.append(run)
            results[run.name] = {"eval": {"all": loss, "text": loss, "image": loss},
                                 "tokens": {"text": 1000 * run.steps, "image": 1000 * run.steps},
                                 "tokens_per_s": 1.0}
            models[run.name] = preset("tiny", ffn=variant, vocab_size=3072, image_offset=2048)
    return results, runs, models


def test_savings_are_read_off_dense_finished_runs() -> None:
    dense = {("dense", 0.5): [3.0, 3.02], ("dense", 1): [2.6, 2.62], ("dense", 2): [2.3, 2.32],
             ("dense", 4): [2.1, 2.12]}
    results, runs, models = fake_results({**dense, ("moma_1t1i", 1): [2.3, 2.32], ("moe_8x", 1): [2.61, 2.62],
                                          ("moma_4t4i", 1): [1.9, 1.92]})
    out = {s["variant"]: s for s in analyse(results, runs, models, seq_len=256)["variants"]}
    # same FLOPs per token as dense (expert choice at capacity factor 1): dense's 2x loss at 1x = 2x savings
    one = out["moma_1t1i"]["savings"]["all"]
    assert one["factor"] == pytest.approx(2.0) and not one["extrapolated"] and not one["no_difference"]
    assert out["dense"]["savings"]["all"]["factor"] == pytest.approx(1.0)
    assert out["dense"]["savings"]["all"]["no_difference"]
    assert out["moe_8x"]["savings"]["text"]["no_difference"]  # 0.005 behind, inside the seed spread
    far = out["moma_4t4i"]["savings"]["image"]
    assert far["extrapolated"] and far["factor"] > 4
    assert math.isclose(out["moma_1t1i"]["loss"]["all"], 2.31)


def test_variants_at_several_budgets_are_each_placed_on_dense_curve() -> None:
    runs = plan_runs(SCALES["cpu"], ["dense", "moma_4t4i"], 2, (1, 4, 8))
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert sorted({r.multiplier for r in runs if r.variant == "dense"}) == [0.5, 1, 2, 4, 8]  # 8x added
    assert sorted((r.multiplier, r.seed) for r in runs if r.variant == "moma_4t4i") == \
        [(1, 0), (1, 1), (4, 0), (4, 1), (8, 0), (8, 1)]
    dense = {("dense", m): [loss, loss + 0.01] for m, loss in ((0.5, 3.0), (1, 2.6), (2, 2.3), (4, 2.1))}
    results, runs, models = fake_results({**dense, ("moma_4t4i", 1): [2.6, 2.61], ("moma_4t4i", 4): [2.3, 2.31]})
    out = {(s["variant"], s["multiplier"]): s for s in analyse(results, runs, models, seq_len=256)["variants"]}
    assert out[("moma_4t4i", 1)]["savings"]["all"]["no_difference"]
    behind = out[("moma_4t4i", 4)]["savings"]["all"]  # dense's 2x loss with 4x the FLOPs: half
    assert behind["factor"] == pytest.approx(0.5, rel=0.02) and not behind["no_difference"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("fs_data"))


def inputs(data: dict[str, Path], eval_path: Path | None = None) -> ExperimentInputs:
    return ExperimentInputs(data=(DataSource(str(data["captions"]), 0.7), DataSource(str(data["books"]), 0.3)),
                            eval_data=(DataSource(str(eval_path or data["captions"])),),
                            text_tokenizer=str(data["text"]), image_tokenizer=str(data["image"]))


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_scale_plans_every_run(scale: str, data: dict[str, Path], tmp_path: Path) -> None:
    """Each shipped scale's runs pass `moma train --check`'s planning (layouts, batch, vocabulary),
    and its variants spend the dense FLOPs per token (MoD less)."""
    s = SCALES[scale]
    runs = plan_runs(s, VARIANTS, s.seeds)
    models = check_runs({r.name: run_tree(s, inputs(data), r, tmp_path) for r in runs}, s.ranks)
    dense = count(models[runs[0].name], s.seq_len).flops_per_token["text"]
    for run in runs:
        flops = count(models[run.name], s.seq_len).flops_per_token["text"]
        if run.variant.endswith("_mod"):  # FLOPs-matched by depth (to the nearest even depth)
            assert models[run.name].n_layers > models[runs[0].name].n_layers
            assert abs(flops / dense - 1) < 0.25, (run.variant, flops / dense)
        else:
            assert abs(flops / dense - 1) < 0.02, (run.variant, flops / dense)  # + the routers' d x E


def test_bad_input_is_refused_before_any_launch(data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        run_experiment(inputs(data), "smoke", tmp_path / "a", ["moma_4t4i", "moma_9x9"])
    with pytest.raises(ConfigError, match="--scale"):
        run_experiment(inputs(data), "huge", tmp_path / "a")
    with pytest.raises(ConfigError, match="--seeds"):
        run_experiment(inputs(data), "smoke", tmp_path / "a", seeds=0)
    with pytest.raises(ConfigError, match="run dense_x0.5_s0: .*eval_sources"):
        run_experiment(inputs(data, tmp_path / "missing"), "smoke", tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_smoke_scale_end_to_end_then_resumes_without_redoing(data: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exp"
    report = run_experiment(inputs(data), "smoke", out, ["moma_4t4i"], seeds=1)
    runs = plan_runs(SCALES["smoke"], ["dense", "moma_4t4i"], 1)
    assert {p.name for p in (out / "runs").iterdir()} == {r.name for r in runs}
    assert [p["multiplier"] for p in report["dense_curve"]] == list(SCALES["smoke"].dense_multipliers)
    flops = [p["flops"]["all"] for p in report["dense_curve"]]
    assert flops == sorted(flops) and flops[0] > 0
    assert [v["variant"] for v in report["variants"]] == ["dense", "moma_4t4i"]
    for name in ("report.md", "report.json", "loss_vs_flops_all.png", "loss_vs_flops_text.png",
                 "loss_vs_flops_image.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "report.md").read_text()
    assert "| moma_4t4i |" in table and "3.7x overall" in table
    assert json.loads((out / "report.json").read_text())["variants"][1]["savings"]["all"].keys() >= {
        "factor", "extrapolated", "no_difference"}

    # a rerun redoes nothing; a run whose result was lost is read back from its own finished run
    (out / "runs" / runs[0].name / "result.json").unlink()
    capsys.readouterr()
    again = run_experiment(inputs(data), "smoke", out, ["moma_4t4i"], seeds=1)
    said = capsys.readouterr().out
    assert said.count("done before, kept") == len(runs) - 1
    assert again["variants"] == report["variants"] and again["dense_curve"] == report["dense_curve"]
    # the same directory with other settings is refused, not mixed in
    with pytest.raises(ConfigError, match="other settings"):
        run_experiment(inputs(data, data["books"]), "smoke", out, ["moma_4t4i"], seeds=1)
