"""`moma upcycle`: a trained moma_1t1i checkpoint -> a moma_NtMi model that starts where it stopped
(MoMa §4.5: train 1t1i, then turn each modality's FFN into a group of experts).

    moma upcycle --from runs/m1/checkpoints --to moma_4t4i --out runs/m1/upcycled_4t4i
    deepspeed --num_gpus 2 --module moma.pipeline.cli train CONFIG model.ffn=moma_4t4i \\
        init_from=runs/m1/upcycled_4t4i model.overrides.router_noise=1.0

Every expert of a group is a copy of that modality's FFN; everything else is copied as is. The
result is the 1t1i model's function, exactly, at the first step: each group's router starts at zero,
so every token's gate is sigmoid(0) = 1/2 and, at capacity factor 1, expert choice's round-robin tie
rule (moe.py `_expert_ranking`) hands each token to exactly one copy (when the group's token count
on a rank divides by its experts; otherwise ceil() gives a few tokens to two copies); the copies'
output projections w2 are scaled by 1/sigmoid(0) = 2, a power of two, so that 1/2 · (2 · w2) is w2
bit for bit. The symmetry between copies is then broken by learning and by the paper's
Gumbel-sigmoid router noise (`model.overrides.router_noise`, training only).

The output is an export directory (model.safetensors etc., loadable by `load_exported`) plus every
rank's loader state at the source step (`loader_states.pt`): `train init_from=DIR` starts from these
weights and this data position (no document repeated, any world size) with a fresh step counter,
optimizer and LR schedule (warmup + decay over the new max_steps).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from moma.pipeline.model.config import ModelConfig, parse_ffn
from moma.pipeline.training.checkpoint import CheckpointError, read_rank_states
from moma.pipeline.training.export import _tag_dir, consolidated_state, expected_shapes, write_model_dir
from moma.tokenizers.fileio import atomic_write

LOADER_STATES = "loader_states.pt"
ROUTER_INIT = 0.0  # every logit 0: gates sigmoid(0) = 1/2, ties everywhere (split round robin)
W2_SCALE = 2.0  # 1 / sigmoid(ROUTER_INIT): a power of two, so the first step is exact
_EXPERT = re.compile(r"^(?P<layer>layers\.\d+\.ffn)\.(?P<group>text|image)_moe\.deepspeed_moe\.experts\."
                     r"deepspeed_experts\.\d+\.(?P<w>w[123])\.weight$")
_ROUTER = re.compile(r"^layers\.\d+\.ffn\.(text|image)_moe\.deepspeed_moe\.gate\.wg\.weight$")


class UpcycleError(CheckpointError):
    pass


def upcycled_config(source: ModelConfig, target_ffn: str) -> ModelConfig:
    """The target model: the source's with `target_ffn`; refuses what cannot be upcycled."""
    src, dst = source.ffn_spec, parse_ffn(target_ffn)
    if src.kind != "moma" or src.learned_routing:
        raise UpcycleError(f"upcycling starts from moma_1t1i (one FFN per modality, no router); this checkpoint "
                           f"holds {source.ffn}")
    if dst.kind != "moma" or not dst.learned_routing:
        raise UpcycleError(f"--to {target_ffn}: the target must be moma_<N>t<M>i with more than one expert in a "
                           f"group (e.g. moma_4t4i)")
    if dst.mod != src.mod:
        want = source.ffn.replace("1t1i", target_ffn.split("_")[1].replace("_mod", ""))
        raise UpcycleError(f"--to {target_ffn}: the source {source.ffn} {'has' if src.mod else 'has no'} "
                           f"mixture-of-depths layers and upcycling keeps them as they are (use {want})")
    if source.router != "expert_choice":
        raise UpcycleError(f"upcycling initialises expert-choice routers; the source's router is {source.router}")
    return dataclasses.replace(source, ffn=target_ffn, aux_routers=False)


def upcycle_state(state: dict[str, torch.Tensor], target: ModelConfig) -> dict[str, torch.Tensor]:
    """The target's tensors (global names) from the source's: FFN copies (w2 scaled), zero routers,
    the rest as is. The source's auxiliary routers are dropped: they predict 1t1i's (absent) choices."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, shape in expected_shapes(target).items():
        m = _EXPERT.match(name)
        if m:
            src = f"{m['layer']}.{m['group']}_ffn.{m['w']}.weight"
            value = state[src] * W2_SCALE if m["w"] == "w2" else state[src].clone()
        elif _ROUTER.match(name):
            src, value = name, torch.full(tuple(shape), ROUTER_INIT)
        else:
            src = name
            if name not in state:
                raise UpcycleError(f"the source checkpoint lacks {name}")
            value = state[name].clone()
        if tuple(value.shape) != tuple(shape):
            raise UpcycleError(f"{name}: shape {tuple(value.shape)} from the source's {src}, expected {tuple(shape)}")
        used.add(src)
        out[name] = value.float()
    left = sorted(k for k in set(state) - used if "causal_routers" not in k)
    if left:
        raise UpcycleError(f"the source has tensors the target has no place for: {left[:5]}")
    return out


def upcycle(source: str | Path, target_ffn: str, out: str | Path) -> Path:
    tag_dir = _tag_dir(source, "--from")
    state, client = consolidated_state(tag_dir)
    src_cfg = ModelConfig.from_json(client["model"])
    target = upcycled_config(src_cfg, target_ffn)
    new_state = upcycle_state(state, target)
    out = Path(out)
    old_world = client["layout"]["world_size"]
    loaders = [st["loader"] for _, st in sorted(read_rank_states(tag_dir, old_world).items())]
    info: dict[str, Any] = {"checkpoint": str(tag_dir), "step": client["step"], "tokens": client["tokens"],
                            "upcycled": {"from": src_cfg.ffn, "to": target_ffn, "router_init": ROUTER_INIT,
                                         "w2_scale": W2_SCALE, "loader_world_size": old_world}}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / LOADER_STATES) as f:
        torch.save({"world_size": old_world, "states": loaders}, f)
    write_model_dir(out, new_state, client, target.to_json(), info)  # export.json last: the directory is done
    return out
