"""The range of every numeric and choice setting of a run config, checked before launch.

    moma train CONFIG --check        # plan_run calls check_settings first: one line naming the key

The types are the config parser's (a string for an int is refused there); here the values: each
setting a run cannot work with (a modulo by zero, a negative count, a seed numpy refuses, a
prefetch loop of 10^12 iterations, a learning rate that makes the first step non-finite) is refused
naming its key, before any process starts. Every value these rules let through works in a short run
(tests/test_config_fields.py: a property test over every field, and real runs of what passes).
"""

from __future__ import annotations

import math
from typing import Any

from moma.pipeline.config_parsing import ConfigError

SEED_MAX = 2**32 - 1  # numpy's seeds; the DataLoader generator's seed is seed * 1_000_003 + rank (< 2**63)
MAX_GRAD_ACCUM = 2**16
MAX_MICRO_TOKENS = 2**24  # micro_batch x seq_len per rank: far beyond any device's activation memory
MAX_PREFETCH = 1024  # DataLoader queues prefetch_factor x workers items at once (a loop that long first)
MAX_TRANSPORT_CHUNK = 1024  # the first batch waits for a whole chunk
MAX_OPEN_SHARDS = 1024  # a stream's lanes are laid out up front (10^12 of them: MemoryError in every rank)


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None)  # None: a setting this version does not have
    return node


def _in(key: str, value: Any, lo: float | None = None, hi: float | None = None, why: str = "",
        lo_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value}: must be a finite number")
    if (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi):
        return
    bounds = ([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []) + ([f"<= {hi}"] if hi is not None else [])
    raise ConfigError(f"{key} = {value}: must be {' and '.join(bounds)}{why}")


# key: (lowest, highest, why); None: no bound on that side
INT_RANGES: dict[str, tuple[int | None, int | None, str]] = {
    "seed": (0, SEED_MAX, " (numpy's seed range)"),
    "max_steps": (1, None, ""),
    "max_nonfinite_in_a_row": (0, None, " (0: stop at the first non-finite loss)"),
    "data.seq_len": (1, None, ""),
    "data.shuffle_buffer": (1, None, " (1: no shuffling)"),
    "data.num_workers": (0, None, " (0: the stream in the rank's own process)"),
    "data.open_shards": (1, MAX_OPEN_SHARDS, ""),
    "data.prefetch_factor": (1, MAX_PREFETCH, ""),
    "data.transport_chunk": (1, MAX_TRANSPORT_CHUNK, " (null: automatic)"),
    "schedule.warmup_steps": (0, None, ""),
    "parallel.ep_size": (1, None, ""),
    "parallel.micro_batch": (1, None, ""),
    "parallel.grad_accum": (1, MAX_GRAD_ACCUM, ""),
    "checkpoint.every": (0, None, " (0: only at the end of each launch)"),
    "checkpoint.keep": (0, None, " (0: keep every checkpoint)"),
    "logging.every": (1, None, ""),
    "eval.every": (0, None, " (0: no held-out evaluation)"),
    "eval.batches": (1, None, ""),
}
FLOAT_RANGES: dict[str, tuple[float | None, float | None, str, bool]] = {  # ..., lowest excluded
    "optim.lr": (0.0, 1.0, "", False),
    "optim.eps": (0.0, None, "", True),
    "optim.weight_decay": (0.0, None, "", False),
    "optim.grad_clip": (0.0, None, " (0: no clipping)", False),
    "schedule.min_lr_ratio": (0.0, 1.0, "", False),
    "logging.peak_flops": (0.0, None, " (null: no MFU)", True),
    "logging.progress_seconds": (0.0, None, "", False),
    "logging.no_expert_warn": (0.0, 1.0, " (1: never warn)", False),
}


# model.overrides (ModelConfig fields; the model checks how they combine): sanity bounds, so that
# `--check` neither hangs (n_layers 2^32: the accounting loops over layers) nor passes a model no
# device can hold; key: (lowest, highest, lowest excluded)
MODEL_RANGES: dict[str, tuple[float, float, bool]] = {
    "d_model": (1, 2**16, False), "n_layers": (1, 1024, False), "n_heads": (1, 1024, False),
    "ffn_hidden": (1, 2**20, False), "token_choice_k": (1, 1024, False), "max_seq_len": (1, 2**24, False),
    "pad_vocab_multiple": (1, 2**16, False), "capacity_factor": (0.0, 1024.0, True),
    "aux_loss_weight": (0.0, 100.0, False), "z_loss_weight": (0.0, 100.0, False), "rope_theta": (0.0, 1e12, True),
    "norm_eps": (0.0, 1.0, True), "init_std": (0.0, 1.0, True), "mod_capacity": (0.0, 1.0, True),
    "router_noise": (0.0, 100.0, False), "router_noise_temperature": (0.0, 100.0, True),
}


def check_model_overrides(overrides: dict[str, Any]) -> None:
    """Each model override within its bounds, and each choice one of its choices."""
    import typing

    from moma.pipeline.model.config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    for name, value in overrides.items():
        key = f"model.overrides.{name}"
        choices = typing.get_args(hints.get(name)) if typing.get_origin(hints.get(name)) is typing.Literal else ()
        if choices and value not in choices:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(map(str, choices))}")
        if name in MODEL_RANGES and isinstance(value, (int, float)):
            lo, hi, lo_open = MODEL_RANGES[name]
            _in(key, value, lo, hi, "", lo_open)


def check_settings(cfg: Any, world_size: int | None = None) -> None:
    """Raise ConfigError naming the first setting out of its range (or choices)."""
    from moma.pipeline.model.config import SIZES, parse_ffn

    check_model_overrides(cfg.model.overrides)
    if cfg.model.preset not in SIZES:
        raise ConfigError(f"model.preset: unknown model preset {cfg.model.preset!r}; choose one of {sorted(SIZES)}")
    try:
        parse_ffn(cfg.model.ffn)
    except ValueError as e:
        raise ConfigError(f"model.ffn: {e}") from None
    for key, (lo, hi, why) in INT_RANGES.items():
        _in(key, _get(cfg, key), lo, hi, why)
    for key, (lo, hi, why, lo_open) in FLOAT_RANGES.items():
        _in(key, _get(cfg, key), lo, hi, why, lo_open)
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas = {betas}: must be two numbers in [0, 1)")
    if cfg.optim.lr * cfg.optim.weight_decay >= 1:
        raise ConfigError(f"optim.weight_decay = {cfg.optim.weight_decay}: with optim.lr {cfg.optim.lr} each step "
                          f"would scale the weights by 1 - lr x weight_decay <= 0; lower it")
    tokens = cfg.parallel.micro_batch * cfg.data.seq_len
    if tokens > MAX_MICRO_TOKENS:
        raise ConfigError(f"parallel.micro_batch {cfg.parallel.micro_batch} x data.seq_len {cfg.data.seq_len} = "
                          f"{tokens} tokens per rank per micro-step: more than {MAX_MICRO_TOKENS}; lower one of them")
