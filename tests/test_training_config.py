"""Run configuration: typed parsing and overrides, every DeepSpeed preset and shipped config, the
learning-rate schedule, and every config error caught before any process group exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from training_fixtures import make_training_data, run_config, write_config

from moma.pipeline.cli import main as cli_main
from moma.pipeline.model.config import preset
from moma.pipeline.training.config import ConfigError, TrainConfig, apply_overrides, from_dict, load_config
from moma.pipeline.training.ds_config import build_ds_config, preset_names
from moma.pipeline.training.run_plan import plan_run
from moma.pipeline.training.train import lr_lambda

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_training_data(tmp_path_factory.mktemp("train_data"))


def test_every_deepspeed_preset_fills_and_parses() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    assert {"zero1_fp32", "zero1_bf16", "zero2_fp32", "zero2_bf16", "zero2_offload_bf16"} <= set(preset_names())
    for name in preset_names():
        cfg = from_dict(TrainConfig, {"parallel": {"ds_config": name, "micro_batch": 3, "grad_accum": 2}})
        ds = build_ds_config(cfg, world_size=1)
        assert ds["train_batch_size"] == 6 and ds["optimizer"]["params"]["lr"] == cfg.optim.lr
        assert "auto" not in json.dumps(ds), name
        parsed = DeepSpeedConfig(ds)  # DeepSpeed's own validation of the filled file
        assert parsed.train_batch_size == 6 and parsed.zero_optimization_stage in (1, 2), name


@pytest.fixture(scope="module")
def wide(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 short documents: enough for every stream of the largest shipped layout (64 ranks x 4 workers)."""
    from moma.pipeline.shards.build import BuildConfig, build

    d = tmp_path_factory.mktemp("wide")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} of the wide set"}) + "\n"
                                          for i in range(300)))
    build(BuildConfig(sources=[f"text:{d / 'docs.jsonl'}"], out=str(d / "shards"), text_tokenizer=str(data["text"]),
                      image_tokenizer=str(data["image"]), num_partitions=1), progress=False)
    return d / "shards"


def shipped_configs() -> list[Path]:
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    return configs


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_run_config_parses_and_plans(path: Path, data: dict[str, Path], wide: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every key of a shipped config is known and typed (load_config), and the whole run plans
    (`moma train --dry-run`) for each world size the config names, with our small shards and
    tokenizers standing in for its paths and every other setting as shipped."""
    text = path.read_text()
    match = re.search(r"^# plans for world sizes: ([\d, ]+)$", text, re.M)
    assert match, f"{path.name} does not say which world sizes it is planned for"
    worlds = [int(w) for w in match.group(1).split(",")]
    cfg = load_config(str(path))  # as shipped: parses and types
    sources = [f"{{path: {wide}, weight: {s.weight}}}" for s in cfg.data.sources]
    local = [f"run_dir={tmp_path / 'run'}", f"data.sources=[{', '.join(sources)}]",
             f"tokenizers.text={data['text']}", f"tokenizers.image={data['image']}"]
    if cfg.data.eval_sources:
        local.append(f"data.eval_sources=[{{path: {wide}}}]")
    for world in worlds:
        plan = plan_run(load_config(str(path), local), world)
        assert plan.ds_config["train_batch_size"] == cfg.parallel.micro_batch * cfg.parallel.grad_accum * world
        assert plan.model.ffn == cfg.model.ffn and plan.model.n_layers == preset(cfg.model.preset).n_layers
        assert cli_main(["train", str(path), *local, "--dry-run", "--world-size", str(world)]) == 0
        assert f"x world size {world} =" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", preset_names())
def test_every_deepspeed_preset_plans_a_run(name: str, data: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_run(from_dict(TrainConfig, run_config(data, tmp_path / "run", parallel__ds_config=name)), 2)
    assert plan.ds_config["zero_optimization"]["stage"] in (1, 2) and plan.ds_config["train_batch_size"] == 4


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["optim.lr=3e-4", "parallel.ep_size=4", "data.keep_images_whole=true",
                             "model.overrides.n_layers=2", "optim.betas=[0.9, 0.99]"])
    assert cfg.optim.lr == 3e-4 and cfg.parallel.ep_size == 4 and cfg.data.keep_images_whole is True
    assert cfg.model.overrides == {"n_layers": 2} and cfg.optim.betas == [0.9, 0.99]
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="parallel.ep_size: expected an integer"):
        load_config(None, ["parallel.ep_size=two"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["lr"])


def test_model_overrides_are_typed_against_the_model_config() -> None:
    # YAML 1.1 reads 1e-5 as the string '1e-5': it must arrive as a float, not fail after launch
    cfg = load_config(None, ["model.overrides.z_loss_weight=1e-5", "model.overrides.qk_norm=false"])
    assert cfg.model.overrides == {"z_loss_weight": 1e-5, "qk_norm": False}
    assert isinstance(cfg.model.overrides["z_loss_weight"], float)
    with pytest.raises(ConfigError, match="model.overrides.d_model: expected an integer, got 'wide'"):
        load_config(None, ["model.overrides.d_model=wide"])
    with pytest.raises(ConfigError, match="unknown config key 'model.overrides.n_layer'"):
        load_config(None, ["model.overrides.n_layer=3"])
    with pytest.raises(ConfigError, match="model.overrides.vocab_size: not settable here"):
        load_config(None, ["model.overrides.vocab_size=100"])
    with pytest.raises(ConfigError, match="data.sources\\[0\\].weight: expected a number"):
        load_config(None, ["data.sources=[{path: x, weight: heavy}]"])


def test_cli_option_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """train-image's --set goes through the same typed parser as the run config."""
    assert cli_main(["tokenizer", "train-image", "--images", str(tmp_path), "--steps", "1", "--set", "ch=wide",
                     "--out", str(tmp_path / "o")]) == 2
    assert "train-image.overrides.ch: expected an integer, got 'wide'" in capsys.readouterr().err
    assert cli_main(["tokenizer", "train-image", "--images", str(tmp_path), "--steps", "1", "--set", "chan=3",
                     "--out", str(tmp_path / "o")]) == 2
    assert "unknown config key 'train-image.overrides.chan'" in capsys.readouterr().err


def test_learning_rate_schedule() -> None:
    cfg = load_config(None, ["max_steps=100", "schedule.warmup_steps=10"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.01) and f(55) == pytest.approx(1 - 0.99 * 0.5)  # linear to 1 %
    cos = lr_lambda(load_config(None, ["max_steps=100", "schedule.warmup_steps=10", "schedule.decay=cosine"]))
    assert cos(55) == pytest.approx(0.505) and cos(100) == pytest.approx(0.01)


def test_plan_describes_the_run(data: dict[str, Path], tmp_path: Path) -> None:
    cfg = from_dict(TrainConfig, run_config(data, tmp_path / "run"))
    plan = plan_run(cfg, world_size=2)
    text = plan.describe()
    assert "2 x grad accum 1 x world size 2 = 4 sequences = 128 tokens per step" in text
    assert "rank 1 (expert-parallel index 1, replica 0): text experts 2-3, image experts 2-3" in text
    assert plan.accounting.total_params > plan.accounting.active_params["text"]


@pytest.mark.parametrize("change,message", [
    ({"parallel__global_batch": 16}, "global_batch = 16, but micro_batch 2 x grad_accum 1 x world size 2 = 4"),
    ({"model__ffn": "moma_3t4i"}, "num_experts % ep_size"),
    ({"parallel__ds_config": "zero3"}, "ZeRO stage 3"),
    ({"parallel__ds_config": "nope"}, "unknown preset 'nope'"),
    ({"model__preset": "7b"}, "unknown model preset '7b'"),
    ({"model__overrides": {"n_layer": 3}}, "n_layer"),
    ({"data__sources": [{"path": "/nonexistent/shards"}]}, "/nonexistent/shards"),
    ({"parallel__ep_size": 3}, "not a multiple of expert-parallel size 3"),
])
def test_config_errors_before_launch(data: dict[str, Path], tmp_path: Path, change: dict, message: str) -> None:
    raw = run_config(data, tmp_path / "run", **change)
    if raw["parallel"]["ds_config"] == "zero3":
        zero3 = tmp_path / "zero3.json"
        zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto",
                                     "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
        raw["parallel"]["ds_config"] = str(zero3)
    with pytest.raises((ConfigError, ValueError), match=message):
        plan_run(from_dict(TrainConfig, raw), world_size=2)


def test_tokenizer_mismatch_is_a_config_error(data: dict[str, Path], tmp_path: Path) -> None:
    from moma.tokenizers.bpe_train import train_bpe

    (tmp_path / "c.txt").write_text("something else entirely\n" * 40)
    train_bpe([str(tmp_path / "c.txt")], 300, tmp_path / "other", progress=False)
    cfg = from_dict(TrainConfig, run_config(data, tmp_path / "run", tokenizers__text=str(tmp_path / "other")))
    with pytest.raises(ConfigError, match="text tokenizer mismatch.*manifest.json has .*run's tokenizers has"):
        plan_run(cfg, world_size=2)


def test_cli_dry_run_and_check(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_config(run_config(data, tmp_path / "run"), tmp_path / "run.yaml")
    assert cli_main(["train", str(path), "--dry-run", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    for section in ("# resolved config", "# batch arithmetic", "# model", "# expert placement", "# data"):
        assert section in out
    assert cli_main(["train", str(path), "--check", "--world-size", "2"]) == 0
    assert cli_main(["train", str(path), "model.ffn=moma_3t3i", "--check", "--world-size", "2"]) == 2
    assert "cannot be split evenly" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path: Path) -> None:
    """TensorBoard is optional (`moma[tensorboard]`): scalars, nested ones by path, read back from the event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moma.pipeline.training.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2):
        writer.write({"step": step, "loss": 1.0 / step, "expert_load": {"text": {"max_over_mean": 1.5}}, "mfu": None})
    writer.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "expert_load/text/max_over_mean"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5)]
