"""Checkpoints: DeepSpeed's own (per-expert files, ZeRO partitions) plus our client state, a
`latest` that only ever names a complete checkpoint, and a layout-free "universal" copy.

    ckpt/global_step200/            DeepSpeed's files: mp_rank_00_model_states.pt (+ client state),
                                    layer_*_expert_*_mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt
    ckpt/global_step200/universal/  rank*.pt: every parameter under its global name with its fp32 master
                                    value and Adam moments (written by the rank that owns it)
    ckpt/global_step200/complete    written after every rank finished
    ckpt/latest                     the tag, written atomically after `complete`

Resuming on the same world size and expert-parallel size goes through DeepSpeed's load_checkpoint
(exact). On another layout DeepSpeed's MoE path fails (DeepSpeed issue #5716, and ds_to_universal
fails for ep > 1), so the engine is built fresh and every parameter and Adam moment is set from the
universal copy by its global name (`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moma.pipeline.errors import MomaError
from moma.pipeline.training.expert_layout import ExpertLayout, is_expert_param
from moma.tokenizers.fileio import atomic_write

LATEST = "latest"
COMPLETE = "complete"
UNIVERSAL = "universal"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class CheckpointError(MomaError):
    pass


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    found = [p for p in ckpt_dir.glob("global_step*") if (p / COMPLETE).exists()]
    return [p.name for p in sorted(found, key=lambda p: int(p.name.removeprefix("global_step")))]


def find_checkpoint(resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """--resume auto: the directory's `latest` (None if there is none); --resume PATH: that checkpoint
    (a tag directory, or a checkpoint directory with `latest`)."""
    if resume is None:
        return None
    if resume == "auto":
        latest = ckpt_dir / LATEST
        return (ckpt_dir, latest.read_text().strip()) if latest.exists() else None
    path = Path(resume)
    if (path / LATEST).exists():
        return path, (path / LATEST).read_text().strip()
    if (path / COMPLETE).exists():
        return path.parent, path.name
    raise CheckpointError(f"--resume {resume}: neither a checkpoint directory with '{LATEST}' nor a complete "
                          f"checkpoint (a global_step* directory with '{COMPLETE}')")


def load_deepspeed_file(path: Path) -> dict[str, Any]:
    # DeepSpeed's own checkpoint files pickle its config objects: full unpickling, of files this
    # project's training wrote.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model_states(tag_dir: Path) -> dict[str, Any]:
    """DeepSpeed's mp_rank_00_model_states.pt of a checkpoint, checked to hold our client state
    (under "moma")."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    states = load_deepspeed_file(path)
    if "moma" not in states:
        raise CheckpointError(f"{path} holds no moma client state: not a checkpoint of `moma train`")
    return states


def global_names(module: torch.nn.Module, ep_rank: int) -> dict[str, str]:
    return ExpertLayout(ep_rank=ep_rank).global_names(module)


def _adam_states(engine: Any) -> list[dict[str, Any]]:
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return [s for s in base.state.values() if "step" in s]


def _link_zero_optimizer_state(engine: Any, create_at_step: int | None = None) -> None:
    """Point every parameter's hp mapping at the Adam moments of its flat fp32 partition.

    DeepSpeed links them once, right after stepping the *first* parameter group, when the other
    groups' moments do not exist yet; with several groups (decay / no decay / experts) their
    fragments stay empty. Relinking fixes that. With `create_at_step`, missing moments (a fresh
    engine being loaded into) are created first, as torch's AdamW would, at that step."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    base = zero.optimizer
    # DeepSpeedZeroOptimizer (ZeRO 1/2) and BF16_Optimizer (bf16 + ZeRO 1) name their groups differently
    flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_groups_flat_partition
    lows = getattr(zero, "bit16_groups", None) or zero.bf16_groups
    for low, flat in zip(lows, flats):
        state = base.state[flat]
        if create_at_step is not None and not state:
            state.update(step=torch.tensor(float(create_at_step)), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
        lazy_init_hp_params_optimizer_state(low, flat, base.state)


def save_universal(engine: Any, directory: Path, ep_rank: int, edp_rank: int) -> None:
    """Every rank takes part (the full-tensor getters are collectives); owners write."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    names = global_names(module, ep_rank)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, Any] = {}
    zero = hasattr(next(module.parameters()), "_hp_mapping")
    if zero:
        _link_zero_optimizer_state(engine)
    for name, p in module.named_parameters():
        if zero:
            fp32 = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_KEYS}
        else:  # ZeRO stage 0: the torch optimizer keeps per-parameter state
            state = engine.optimizer.state.get(p, {})
            fp32, moments = p.detach().float(), {k: state.get(k) for k in ADAM_KEYS}
        owner = edp_rank == 0 if is_expert_param(name) else rank == 0
        if owner:
            out[names[name]] = {"fp32": fp32.detach().cpu().clone(),
                                **{k: v.detach().cpu().clone() if v is not None else None for k, v in moments.items()}}
    steps = [int(s["step"]) for s in _adam_states(engine)]
    if out:
        out["__step__"] = max(steps) if steps else 0
        with atomic_write(directory / UNIVERSAL / f"rank{rank:05d}.pt") as f:
            torch.save(out, f)


def load_universal(engine: Any, directory: Path, ep_rank: int) -> None:
    """Set every local parameter and its Adam moments from the universal copy (any layout)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    merged: dict[str, Any] = {}
    files = sorted((directory / UNIVERSAL).glob("rank*.pt"))
    if not files:
        raise CheckpointError(f"{directory} has no {UNIVERSAL}/ copy (checkpoint.universal was off), so it can "
                              f"only resume on the world size and expert-parallel size that wrote it")
    step = 0
    for f in files:
        part = torch.load(f, map_location="cpu", weights_only=True)  # tensors and ints only
        step = max(step, int(part.pop("__step__", 0)))
        merged.update(part)
    module = engine.module
    names = global_names(module, ep_rank)
    zero = hasattr(next(module.parameters()), "_hp_mapping")
    missing = [names[n] for n, _ in module.named_parameters() if names[n] not in merged]
    if missing:
        raise CheckpointError(f"{directory}/{UNIVERSAL} lacks {len(missing)} parameters of this model, e.g. "
                              f"{missing[:3]}: it was written by another model")
    if zero:
        _link_zero_optimizer_state(engine, create_at_step=step)
    for name, p in module.named_parameters():
        entry = merged[names[name]]
        if tuple(entry["fp32"].shape) != tuple(p.shape):
            raise CheckpointError(f"{names[name]}: saved shape {tuple(entry['fp32'].shape)} != {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(entry["fp32"].to(p.device, p.dtype))
        if zero:
            safe_set_full_fp32_param(p, entry["fp32"].to(p.device))
            for k in ADAM_KEYS:
                if entry[k] is not None:
                    safe_set_full_optimizer_state(p, entry[k].to(p.device), k)
        else:
            state = engine.optimizer.state.setdefault(p, {})
            for k in ADAM_KEYS:
                if entry[k] is not None:
                    state[k] = entry[k].to(p.device).clone()
            state["step"] = torch.tensor(float(step))
    for s in _adam_states(engine):
        s["step"] = torch.tensor(float(step)) if torch.is_tensor(s["step"]) else step


def write_complete_and_latest(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Rank 0, after a barrier: mark the checkpoint complete, point `latest` at it, drop old ones."""
    (ckpt_dir / tag / COMPLETE).write_text("ok\n")
    with atomic_write(ckpt_dir / LATEST, "w") as f:
        f.write(tag)
    for old in tags(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    for partial in ckpt_dir.glob("global_step*"):  # leftovers of a save that was killed
        if not (partial / COMPLETE).exists() and partial.name != tag:
            shutil.rmtree(partial, ignore_errors=True)

