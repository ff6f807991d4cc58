"""The run configuration: one typed tree (data, tokenizers, model, optimizer, schedule, parallel,
checkpointing, logging), read from YAML/JSON plus `a.b=c` overrides, written resolved into the run
directory.

    moma train jobs/configs/demo_tiny.yaml model.ffn=moma_2t2i optim.lr=3e-4 --dry-run

Unknown keys, wrong types and impossible values are errors that name the key, raised before any
process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from moma.pipeline.errors import MomaError


class ConfigError(MomaError):
    """A run configuration that cannot work, found before launch."""


@dataclasses.dataclass
class SourceConfig:
    path: str  # shard directory, or DIR/prefix-{000000..000099}.tar
    weight: float = 1.0


@dataclasses.dataclass
class DataConfig:
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    seq_len: int = 256
    shuffle_buffer: int = 1000
    num_workers: int = 2
    keep_images_whole: bool = False
    strict: bool = False


@dataclasses.dataclass
class TokenizerConfig:
    text: str = ""  # moma tokenizer dir / .tiktoken file
    image: str | None = None  # train-image output dir / checkpoint / vqgan.ckpt
    text_pattern: str | None = None


@dataclasses.dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | 90m | 435m | 1.4b
    ffn: str = "moma_4t4i"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # any ModelConfig field


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclasses.dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay: str = "linear"  # linear (to min_lr_ratio, the paper's) | cosine
    min_lr_ratio: float = 0.01


@dataclasses.dataclass
class ParallelConfig:
    ds_config: str = "zero2_fp32"  # a preset in ds_configs/ or a path to a DeepSpeed JSON
    ep_size: int = 1
    micro_batch: int = 4  # sequences per rank per micro-step
    grad_accum: int = 1
    global_batch: int | None = None  # optional check: must equal micro_batch * grad_accum * data-parallel size


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    dir: str | None = None  # default: <run_dir>/checkpoints
    universal: bool = True  # also write a layout-free copy (resume on another world / expert-parallel size)


@dataclasses.dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = False
    peak_flops: float | None = None  # per device, for MFU (e.g. 989e12 for H100 bf16 dense)


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    stop_at_step: int | None = None  # end this launch early (checkpointed); the schedule still spans max_steps
    max_nonfinite_in_a_row: int = 5  # NaN/inf losses skipped in a row before checkpoint-and-stop
    # Fault injection for tests of the skip path: each occurrence of step s makes one more micro-batch
    # of step s non-finite (on every rank). Empty in real runs.
    debug_nonfinite_at: list[int] = dataclasses.field(default_factory=list)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizers: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- generic typed parsing ---------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot, no exponent sign) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known here: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` (c parsed as YAML: numbers, lists, booleans, null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=3e-4)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    data: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            data = (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot be parsed ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


def save_config(cfg: TrainConfig, path: Path) -> None:
    from moma.tokenizers.fileio import atomic_write

    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg.to_json(), f, sort_keys=False)
