"""DeepSpeed JSON presets (ds_configs/) filled from the run config.

A preset holds the parallelism and precision knobs (ZeRO stage, buckets, bf16, offload); the fields
that depend on the run are "auto" and filled here: micro batch, accumulation, train_batch_size =
micro x accumulation x world size, gradient clipping, the optimizer's hyper-parameters. A preset
that hard-codes one of them must agree with the run config, or it is an error naming both values.

    python -c "from moma.pipeline.training.ds_config import preset_names; print(preset_names())"
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path
from typing import Any

from moma.pipeline.training.config import ConfigError, TrainConfig

AUTO = "auto"


def preset_names() -> list[str]:
    root = importlib.resources.files("moma.ds_configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"parallel.ds_config: file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory ('' is '.'), unreadable, not text
            raise ConfigError(f"parallel.ds_config: cannot read {name_or_path!r} as a DeepSpeed JSON file "
                              f"({getattr(e, 'strerror', None) or e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"parallel.ds_config: {path} is not valid JSON ({e})") from None
    names = preset_names()
    if name_or_path not in names:
        raise ConfigError(f"parallel.ds_config: unknown preset {name_or_path!r}; presets: {names} (or a path)")
    resource = importlib.resources.files("moma.ds_configs") / f"{name_or_path}.json"
    return json.loads(resource.read_text())


def _fill(node: dict[str, Any], key: str, value: Any, where: str) -> None:
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
    elif current != value:
        raise ConfigError(f"DeepSpeed config sets {where} = {current!r} but the run config gives {value!r}; "
                          f"set it to \"auto\" or change the run config")


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The complete DeepSpeed config for this run on `world_size` ranks (checked, no DeepSpeed import)."""
    p = cfg.parallel
    if p.micro_batch < 1 or p.grad_accum < 1:
        raise ConfigError(f"parallel.micro_batch ({p.micro_batch}) and parallel.grad_accum ({p.grad_accum}) "
                          f"must be >= 1")
    global_batch = p.micro_batch * p.grad_accum * world_size
    if p.global_batch is not None and p.global_batch != global_batch:
        raise ConfigError(f"parallel.global_batch = {p.global_batch}, but micro_batch {p.micro_batch} x grad_accum "
                          f"{p.grad_accum} x world size {world_size} = {global_batch}")
    ds = copy.deepcopy(load_preset(p.ds_config))
    _fill(ds, "train_micro_batch_size_per_gpu", p.micro_batch, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", p.grad_accum, "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", global_batch, "train_batch_size")
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "gradient_clipping")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    o = cfg.optim
    for key, value in (("lr", o.lr), ("betas", list(o.betas)), ("eps", o.eps), ("weight_decay", o.weight_decay)):
        _fill(params, key, value, f"optimizer.params.{key}")
    if cfg.aux_routers_from:
        # fitting the auxiliary routers: the main model is frozen (no gradients, no optimizer state) and
        # the routers are a few MB, so there is nothing for ZeRO to partition — and DeepSpeed's ZeRO
        # optimizer refuses a MoE model without a trainable expert parameter group. Plain data parallel.
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": 0}
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") and zero_stage(ds) == 0 and "grad_accum_dtype" in ds.get("data_types", {}):
        # DeepSpeed 0.19.8 accumulates bf16 gradients in fp32 only under ZeRO 1/2 (stage 0 raises
        # "unsupported mix"); stage 0 here is the auxiliary-router fit, a few MB of trainable weights
        ds["data_types"] = {k: v for k, v in ds["data_types"].items() if k != "grad_accum_dtype"}
    if bf16.get("enabled") and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32" \
            and zero_stage(ds) == 1 and not bf16.get("immediate_grad_update"):
        # DeepSpeed 0.19.8 then uses its BF16_Optimizer, which clears the bf16 .grad before each backward
        # only from hooks on the forward's output tensors; our forward returns a ModelOutput dataclass, which
        # DeepSpeed does not look into: each micro-batch re-added the earlier ones (4 g1 + 3 g2 + 2 g3 + g4
        # at accumulation 4; tests/test_bf16.py). immediate_grad_update moves each gradient into the fp32
        # buffer as it is produced and drops the bf16 one.
        raise ConfigError("bf16 with data_types.grad_accum_dtype fp32 under ZeRO stage 0/1 needs "
                          "bf16.immediate_grad_update: true (DeepSpeed's BF16_Optimizer double-counts accumulated "
                          "gradients otherwise)")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError("fp16 is not supported (use bf16 or fp32; fp16 also fails on CPU)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage {stage!r} is not a ZeRO stage")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict[str, Any]) -> str:
    return "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"
