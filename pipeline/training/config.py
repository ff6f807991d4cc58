"""The run configuration: one typed tree (data, tokenizers, model, optimizer, schedule, parallel,
checkpointing, logging), read from YAML/JSON plus `a.b=c` overrides, written resolved into the run
directory.

    moma train jobs/configs/demo_tiny.yaml model.ffn=moma_2t2i optim.lr=3e-4 --dry-run

Every setting is defined once, with its default, in the dataclass of the stage that uses it: the
`data` section is the loader's own DataConfig, `model.overrides` holds ModelConfig fields (typed
against ModelConfig itself). Unknown keys, wrong types and impossible values are errors that name
the key, raised before any process group exists (config_parsing.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from moma.pipeline.config_parsing import ConfigError, apply_overrides, fields_of, from_dict, read_tree, to_tree
from moma.pipeline.loader.loader import DataConfig

__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "from_dict", "load_config", "save_config"]


@dataclasses.dataclass
class TokenizerConfig:
    text: str = ""  # moma tokenizer dir / .tiktoken file
    image: str | None = None  # train-image output dir / checkpoint / vqgan.ckpt
    text_pattern: str | None = None


@dataclasses.dataclass
class ModelSection:
    preset: str = "tiny"  # tiny | 90m | 435m | 1.4b
    ffn: str = "moma_4t4i"
    # a "_mod" variant gets the depth that matches the FLOPs/token of the model without MoD at the
    # preset's (or the overridden) n_layers, as the paper's Table 1; false: n_layers as given
    match_mod_depth: bool = True
    # any ModelConfig field but those the tokenizers and `ffn` decide, typed against ModelConfig
    overrides: dict[str, Any] = fields_of("moma.pipeline.model.config:ModelConfig",
                                          exclude=("vocab_size", "image_offset", "pad_id", "ffn"))


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
    every: int = 100  # steps between checkpoints; 0: only at the end of each launch (and at a stop)
    keep: int = 3
    dir: str | None = None  # default: <run_dir>/checkpoints
    # the layout-free copy (resume on another world / expert-parallel size): "final" = at the last save of
    # each launch (end, stop_at_step, preemption), "always" = at every save, "never"
    universal: str = "final"


@dataclasses.dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = False
    peak_flops: float | None = None  # per device, for MFU (e.g. 989e12 for H100 bf16 dense)
    progress_seconds: float = 10.0  # a plain progress line this often when stderr is not a terminal
    # warn when a layer group leaves more than this share of its tokens to no expert (routing health);
    # expert choice at capacity factor 1 starts near 0.32 with 4 experts ranked by sigmoid; 1 disables it
    no_expert_warn: float = 0.5


@dataclasses.dataclass
class EvalConfig:
    every: int = 0  # held-out evaluation every this many steps (and at the end); 0: never
    batches: int = 8  # the fixed held-out set (training/evaluate.py), micro-batch-sized batches


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    stop_at_step: int | None = None  # end this launch early (checkpointed); the schedule still spans max_steps
    max_nonfinite_in_a_row: int = 5  # NaN/inf losses skipped in a row before checkpoint-and-stop
    # a pre-trained checkpoint whose model is frozen while this run fits its auxiliary routers (MoMa
    # §2.4) to its expert-choice selections (`moma train-aux-routers`); None: ordinary training
    aux_routers_from: str | None = None
    # a model directory to start from (`moma upcycle`'s output, or an export): its weights, and its
    # data position when it has one; step counter, optimizer and LR schedule start fresh. Ignored
    # once this run has a checkpoint of its own (--resume auto continues that).
    init_from: str | None = None
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
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def to_json(self) -> dict[str, Any]:
        return to_tree(self)


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    data = read_tree(path) if path else {}
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


def save_config(cfg: TrainConfig, path: Path) -> None:
    from moma.tokenizers.fileio import atomic_write

    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg.to_json(), f, sort_keys=False)
