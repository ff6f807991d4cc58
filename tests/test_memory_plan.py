"""The memory plan of `moma train --dry-run`: the activation estimate (per token per layer, measured
with saved-tensor hooks on 1- and 2-layer models) against the saved bytes of the whole model's
forward, the ZeRO arithmetic, refusing a layout that does not fit, and ep 8 for moma_4t4i.

    .venv/bin/python -m pytest tests/test_memory_plan.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moma.pipeline.model.config import preset
from moma.pipeline.training.config import ConfigError
from moma.pipeline.training.memory_plan import (
    GB,
    _measuring_model,
    activation_bytes_per_token,
    plan_memory,
    saved_bytes,
    working_ep_sizes,
)


@pytest.mark.parametrize("size,ffn,micro,seq", [("tiny", "dense", 2, 384), ("tiny", "moma_4t4i", 2, 384),
                                                ("tiny", "moma_4t4i_mod", 1, 512), ("90m", "moma_4t4i", 1, 512)])
def test_activation_estimate_matches_the_whole_models_saved_bytes(size: str, ffn: str, micro: int, seq: int) -> None:
    """The estimate (per-token bytes from 1 and 2 layers at 256 tokens, x layers x tokens) against
    the whole model's saved-for-backward bytes at another micro-batch and length: within 10 %."""
    cfg = preset(size, ffn=ffn, max_seq_len=seq)
    per_layer, base = activation_bytes_per_token(cfg)
    estimate = micro * seq * (per_layer * cfg.n_layers + base)
    measured = saved_bytes(_measuring_model(cfg, torch.bfloat16), micro, seq)
    assert abs(estimate / measured - 1) < 0.10, (estimate, measured)
    assert per_layer > 0 and base > 0


def test_zero_partitions_and_the_layout_items() -> None:
    """ZeRO-2 divides gradients and optimizer states by the world size (experts by their expert-data
    group), weights by the expert-parallel size only; ZeRO-1 keeps full fp32 gradients."""
    from moma.pipeline.model.accounting import count

    cfg = preset("tiny", ffn="moma_4t4i", max_seq_len=256)
    acc = count(cfg, 256)
    shared, experts = acc.total_params - acc.expert_params, acc.expert_params
    z2 = plan_memory(cfg, world_size=8, ep_size=4, micro_batch=1, seq_len=256, zero_stage=2, bf16=True)
    assert z2.items["weights"] == 2 * (shared + experts / 4)
    assert z2.items["gradients"] == pytest.approx(4 * (shared + experts) / 8)
    assert z2.items["optimizer"] == pytest.approx(12 * (shared + experts) / 8)
    assert z2.items["buckets"] == 2 * 2 * 5e8  # two reduce buckets (overlap_comm) of bf16
    z1 = plan_memory(cfg, world_size=8, ep_size=4, micro_batch=2, seq_len=256, zero_stage=1, bf16=True)
    assert z1.items["gradients"] == 4 * (shared + experts / 4)  # BF16_Optimizer: a full fp32 buffer
    assert z1.items["activations"] == pytest.approx(2 * z2.items["activations"])


def test_a_layout_that_does_not_fit_is_refused_naming_its_biggest_item() -> None:
    cfg = preset("90m", ffn="dense", max_seq_len=4096)
    plan = plan_memory(cfg, world_size=1, ep_size=1, micro_batch=16, seq_len=4096, zero_stage=1, bf16=True,
                       gpu_memory_gb=40)
    assert not plan.fits and plan.biggest()[0] == "activations"
    with pytest.raises(ConfigError, match=r"more than --gpu-memory 40 GB; the biggest item is activations "
                                          r"\([0-9.]+ GB\): lower parallel.micro_batch"):
        plan.check()
    plan_memory(cfg, 1, 1, 1, 4096, 1, True, gpu_memory_gb=80).check()  # one sequence fits
    assert plan.total_gb == pytest.approx(sum(plan.items.values()) / GB)


def test_ep8_is_impossible_for_moma_4t4i_and_the_error_says_what_works() -> None:
    cfg = preset("1.4b", ffn="moma_4t4i")
    assert working_ep_sizes(cfg, 8) == [1, 2, 4] and working_ep_sizes(cfg, 64) == [1, 2, 4]
    assert working_ep_sizes(preset("1.4b", ffn="dense"), 8) == [1]
    proc = subprocess.run([sys.executable, "-m", "moma.pipeline.training.memory_plan", "--preset", "1.4b",
                           "--world-size", "8", "--ep", "8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot be split evenly over expert-parallel size 8" in proc.stderr
    assert "layouts that work on 8 GPUs: ep_size 1, 2, 4" in proc.stderr


@pytest.mark.slow
def test_train_dry_run_prints_the_plan_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    from launch_fixtures import cpu_env
    from training_fixtures import make_training_data, run_config, write_config

    data = make_training_data(tmp_path / "data")
    config = write_config(run_config(data, tmp_path / "run", parallel__ds_config="zero2_bf16"), tmp_path / "c.yaml")
    base = [sys.executable, "-m", "moma.pipeline.cli", "train", str(config), "--world-size", "2"]
    ok = subprocess.run([*base, "--dry-run"], capture_output=True, text=True, timeout=300, env=cpu_env())
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "# memory per GPU (planned)" in ok.stdout and "of 80 GB: fits" in ok.stdout
    refused = subprocess.run([*base, "--check", "--gpu-memory", "1"], capture_output=True, text=True, timeout=300,
                             env=cpu_env())
    assert refused.returncode != 0
    assert "more than --gpu-memory 1 GB; the biggest item is overhead (2.5 GB)" in refused.stderr
    wide = run_config(data, tmp_path / "run8", parallel__ds_config="zero2_bf16", parallel__ep_size=8)
    wide["data"]["sources"] = wide["data"]["sources"][:1]  # 120 documents: enough for 8 ranks' streams
    config = write_config(wide, tmp_path / "c8.yaml")
    bad_ep = subprocess.run([sys.executable, "-m", "moma.pipeline.cli", "train", str(config),
                             "--world-size", "8", "--check"], capture_output=True, text=True, timeout=300,
                            env=cpu_env())
    assert bad_ep.returncode != 0 and "layouts that work on 8 GPUs: ep_size 1, 2, 4" in bad_ep.stderr, bad_ep.stderr
