"""Mixture-of-depths (the "_mod" variants): on alternating layers from 0 each sequence keeps its top
mod_capacity of tokens for the block, the rest skip it; the router is trained through the kept
tokens' scaled outputs; the accounting counts what is skipped.

    .venv/bin/python -m pytest tests/test_mod.py
"""

from __future__ import annotations

import math

import pytest
import torch

from moma.pipeline.model.accounting import count
from moma.pipeline.model.config import ModelConfig, preset
from moma.pipeline.model.transformer import Transformer
from moma.pipeline.training.engine import build_model, configure_accelerator

configure_accelerator()


def small(ffn: str, **kw: object) -> ModelConfig:
    return ModelConfig(vocab_size=300, image_offset=200, d_model=32, n_layers=4, n_heads=2, ffn_hidden=48, ffn=ffn,
                       max_seq_len=64, **kw)


def mixed_ids(b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (b, t), generator=g)
    ids[:, 5:15] = torch.randint(200, 300, (b, 10), generator=g)
    return ids


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
        plain, mod = count(preset(size, ffn="moma_4t4i")), count(preset(size, ffn="moma_4t4i_mod"))
        with torch.device("meta"):
            n = sum(p.numel() for p in Transformer(preset(size, ffn="moma_4t4i_mod")).parameters())
        assert n == mod.total_params  # the routers' parameters, every one
        # half the layers see a quarter of the tokens: fewer FLOPs, but more than the plain model's half
        assert 0.5 * plain.flops_per_token["text"] < mod.flops_per_token["text"] < plain.flops_per_token["text"]
        assert mod.active_params["image"] < plain.active_params["image"]


def test_bad_mod_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mod_capacity must lie in \(0, 1\]"):
        small("moma_4t4i_mod", mod_capacity=1.5)
    with pytest.raises(ValueError, match="unknown FFN variant"):
        small("moma_4t4i_mood")
    model = build_model(small("dense_mod"), seed=0)
    from moma.pipeline.model.transformer import KVCache

    with pytest.raises(ValueError, match="mixture-of-depths .* not causal"):
        model(mixed_ids()[:, :3], cache=KVCache(4))
