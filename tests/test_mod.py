"""Mixture-of-depths (the "_mod" variants): on alternating layers from 0 each sequence keeps its top
mod_capacity of tokens for the block, the rest skip it; the router is trained through the kept
tokens' scaled outputs; the accounting counts what is skipped.

    .venv/bin/python -m pytest tests/test_mod.py
"""

from __future__ import annotations

import math

import model_fixtures
import pytest
import torch
from model_fixtures import mixed_ids

from moma.pipeline.model.accounting import count
from moma.pipeline.model.config import ModelConfig, preset
from moma.pipeline.model.transformer import Transformer
from moma.pipeline.training.engine import build_model, configure_accelerator

configure_accelerator()


def small(ffn: str, **kw: object) -> ModelConfig:
    return model_fixtures.small(ffn, n_layers=4, **kw)  # MoD alternates: layers 0 and 2 of 4


@pytest.mark.parametrize("ffn", ["dense_mod", "moma_4t4i_mod"])
def test_mod_layers_keep_a_quarter_and_the_rest_skip_the_block(ffn: str) -> None:
    model = build_model(small(ffn), seed=1)
    assert [layer.mod_router is not None for layer in model.layers] == [True, False, True, False]
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    def keep(i: int):
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[i], outputs[i] = args[0], out
        return hook

    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(keep(i))
    out = model(mixed_ids(), mixed_ids().roll(-1, 1))
    for i in (0, 2):
        kept = model.layers[i].last_kept
        assert kept.shape == (2, math.ceil(0.25 * 24))
        skipped = torch.ones(2, 24, dtype=torch.bool).scatter(1, kept, False)
        assert torch.equal(outputs[i][skipped], inputs[i][skipped])  # skipped tokens: the residual stream only
        assert not torch.equal(outputs[i][~skipped], inputs[i][~skipped])
    out.loss.backward()
    assert all(float(layer.mod_router.weight.grad.abs().sum()) > 0 for layer in model.layers[::2])


@pytest.mark.parametrize("ffn", ["dense_mod", "moma_4t4i_mod"])
def test_mod_variants_train(ffn: str) -> None:
    torch.manual_seed(0)
    model = build_model(small(ffn), seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = mixed_ids(4, 32, seed=5)
    losses = []
    for _ in range(30):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_the_accounting_counts_what_mod_skips() -> None:
    for size in ("tiny", "90m"):
        same_depth = preset(size, ffn="moma_4t4i_mod", match_mod_depth=False)
        plain, mod = count(preset(size, ffn="moma_4t4i")), count(same_depth)
        with torch.device("meta"):
            n = sum(p.numel() for p in Transformer(same_depth).parameters())
        assert n == mod.total_params  # the routers' parameters, every one
        # half the layers see a quarter of the tokens: fewer FLOPs, but more than the plain model's half
        assert 0.5 * plain.flops_per_token["text"] < mod.flops_per_token["text"] < plain.flops_per_token["text"]
        assert mod.active_params["image"] < plain.active_params["image"]


def test_mod_variants_are_flops_matched_to_dense_by_depth_as_in_the_papers_table_1() -> None:
    from moma.pipeline.model.accounting import mod_matched_depth

    # the paper's Table 1 adds layers: 90m 8 -> 14, 435m 24 -> 40 (1.4b: 40 by the same rule)
    assert {size: preset(size, ffn="moma_4t4i_mod").n_layers for size in ("90m", "435m", "1.4b")} == \
        {"90m": 14, "435m": 40, "1.4b": 40}
    for size in ("tiny", "90m", "435m", "1.4b"):
        for ffn in ("moma_4t4i_mod", "dense_mod", "moe_8x_mod"):
            mod, plain = preset(size, ffn=ffn), preset(size, ffn=ffn.removesuffix("_mod"))
            ratio = count(mod).flops_per_token["image"] / count(plain).flops_per_token["image"]
            if size != "tiny":
                assert abs(ratio - 1) < 0.02, (size, ffn, ratio)
            # the nearest even depth: two layers more or fewer are further from dense's FLOPs
            for other in (mod.n_layers - 2, mod.n_layers + 2):
                alt = count(preset(size, ffn=ffn, n_layers=other, match_mod_depth=False)).flops_per_token["image"]
                assert abs(alt / count(plain).flops_per_token["image"] - 1) >= abs(ratio - 1)
    assert preset("90m", ffn="moma_4t4i_mod", match_mod_depth=False).n_layers == 8  # as given
    assert mod_matched_depth(preset("90m", ffn="moma_4t4i")) == 8  # nothing to match without MoD


def test_bad_mod_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mod_capacity must lie in \(0, 1\]"):
        small("moma_4t4i_mod", mod_capacity=1.5)
    with pytest.raises(ValueError, match="unknown FFN variant"):
        small("moma_4t4i_mood")
    model = build_model(small("dense_mod"), seed=0)
    from moma.pipeline.model.transformer import KVCache

    with pytest.raises(ValueError, match="mixture-of-depths .* not causal"):
        model(mixed_ids()[:, :3], cache=KVCache(4))


# --- for real: the deepspeed launcher, 2 gloo ranks, expert parallel 2 ----------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    from training_fixtures import make_training_data

    return make_training_data(tmp_path_factory.mktemp("mod_data"))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero1_fp32", "zero2_fp32"])
def test_mod_under_the_launcher_resumes_exactly_and_exports(ds_config: str, data, tmp_path) -> None:
    """moma_4t4i_mod with ZeRO-1/2 and ep 2: 6 steps in one launch = 3 steps, stop, resume to 6 (every
    loss and document bit for bit); the export reloads to the engine's logits."""
    from dist_fixtures import run_distributed_test
    from launch_fixtures import run_deepspeed
    from test_training_distributed import probe_checkpoint
    from training_fixtures import run_config, write_config

    from moma.pipeline.training.export import export_checkpoint, load_exported
    from moma.pipeline.training.metrics import read_metrics

    train = ["--module", "moma.pipeline.cli", "train"]
    configs = {}
    for name in ("whole", "split"):
        configs[name] = write_config(run_config(data, tmp_path / name, max_steps=6, model__ffn="moma_4t4i_mod",
                                                parallel__ds_config=ds_config, checkpoint__every=3),
                                     tmp_path / f"{name}.yaml")
    run_deepspeed([*train, str(configs["whole"]), "--resume", "auto"], log=tmp_path / "whole.log")
    run_deepspeed([*train, str(configs["split"]), "stop_at_step=3", "--resume", "auto"], log=tmp_path / "s1.log")
    run_deepspeed([*train, str(configs["split"]), "--resume", "auto"], log=tmp_path / "s2.log")
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["loss_text"], ra["loss_image"]) == (rb["loss"], rb["loss_text"], rb["loss_image"])
        assert ra["docs_digest"] == rb["docs_digest"]
    ckpt = tmp_path / "whole" / "checkpoints"
    records = run_distributed_test(probe_checkpoint, world_size=2, func_args=(configs["whole"], ckpt),
                                   func_kwargs={"logits": True})
    model = load_exported(export_checkpoint(ckpt, tmp_path / "export"))
    for rec in records:
        with torch.no_grad():
            mine = model(rec["ids"]).logits
        assert torch.allclose(mine, rec["logits"], atol=1e-5), float((mine - rec["logits"]).abs().max())
