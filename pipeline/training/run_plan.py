"""Everything about a run that can be known before any process starts: the resolved config, the
vocabulary and its identity checks against the shards, the model config and its accounting, the
DeepSpeed config with its batch arithmetic, and where every expert lives.

    moma train CONFIG --dry-run [--world-size N]       # prints RunPlan.describe() and exits

`plan_run` raises ConfigError (one clear line) for every configuration that cannot work, so the
job scripts call `moma train CONFIG --check` before they start the deepspeed launcher.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from moma.pipeline.errors import MomaError
from moma.pipeline.loader.loader import resolve_sources
from moma.pipeline.model.accounting import Accounting, count
from moma.pipeline.model.config import ModelConfig, preset
from moma.pipeline.shards.manifest import Manifest
from moma.pipeline.training.checkpoint import UNIVERSAL_POLICIES
from moma.pipeline.training.config import ConfigError, TrainConfig
from moma.pipeline.training.config_checks import check_settings
from moma.pipeline.training.ds_config import build_ds_config, precision, zero_stage
from moma.pipeline.training.expert_layout import ParallelConfigError, check_parallel_layout, placement
from moma.tokenizers.image_tokenizer import CONFIG_FILE, ImageTokenizer
from moma.tokenizers.text import TextTokenizer
from moma.tokenizers.vocab import IdentityMismatchError, TokenizerIdentity, Vocab


@dataclasses.dataclass
class RunPlan:
    cfg: TrainConfig
    world_size: int
    vocab: Vocab
    model: ModelConfig
    ds_config: dict[str, Any]
    accounting: Accounting
    manifests: list[Manifest]

    @property
    def tokens_per_step(self) -> int:
        return self.ds_config["train_batch_size"] * self.cfg.data.seq_len

    def expert_layout(self) -> list[str]:
        """Which global experts each rank holds."""
        return placement(self.model, self.cfg.parallel.ep_size, self.world_size)

    def describe(self) -> str:
        c, ds = self.cfg, self.ds_config
        acc = self.accounting
        m = 1e6
        lines = ["# resolved config", yaml.safe_dump(c.to_json(), sort_keys=False).rstrip(), "",
                 "# batch arithmetic",
                 f"micro batch {c.parallel.micro_batch} x grad accum {c.parallel.grad_accum} x world size "
                 f"{self.world_size} = {ds['train_batch_size']} sequences = {self.tokens_per_step} tokens per step "
                 f"(seq_len {c.data.seq_len}); {c.max_steps} steps = {self.tokens_per_step * c.max_steps / 1e6:.2f} M "
                 f"tokens", f"ZeRO stage {zero_stage(ds)}, {precision(ds)}, expert-parallel size {c.parallel.ep_size}, "
                 f"data-parallel size {self.world_size}", "",
                 "# model", f"{self.model.ffn} {c.model.preset}: {acc.total_params / m:.2f} M parameters "
                 f"({acc.expert_params / m:.2f} M in experts); active per token text "
                 f"{acc.active_params['text'] / m:.2f} M, image {acc.active_params['image'] / m:.2f} M; "
                 f"training FLOPs per token text "
                 f"{acc.flops_per_token['text'] / 1e9:.4f} G, image {acc.flops_per_token['image'] / 1e9:.4f} G",
                 self.vocab.describe(), "", "# expert placement", *self.expert_layout(), "",
                 "# data", *(f"{s.path} (weight {s.weight}): {mf.totals['docs']} docs, {mf.totals['tokens']}"
                             for s, mf in zip(c.data.sources, self.manifests))]
        return "\n".join(lines)


def image_identity(path: str) -> TokenizerIdentity:
    """The identity recorded by train-image (cheap), or computed by loading other formats."""
    meta = Path(path) / CONFIG_FILE
    if meta.exists():
        return TokenizerIdentity.from_json(json.loads(meta.read_text())["identity"])
    return ImageTokenizer.load(path).identity


def run_vocab(cfg: TrainConfig) -> Vocab:
    if not cfg.tokenizers.text:
        raise ConfigError("tokenizers.text is required (the BPE the shards were built with)")
    try:
        text = TextTokenizer.load(cfg.tokenizers.text, pattern=cfg.tokenizers.text_pattern).identity
        image = image_identity(cfg.tokenizers.image) if cfg.tokenizers.image else None
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizers: {e}") from None
    return Vocab(text=text, image=image)


def model_config(cfg: TrainConfig, vocab: Vocab) -> ModelConfig:
    """The preset with the run's overrides (already typed against ModelConfig by the config tree)."""
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("max_seq_len", cfg.data.seq_len)
    noise_applies = overrides.get("router", "expert_choice") == "expert_choice" and \
        overrides.get("moe_dispatch", "moma") == "moma"
    if cfg.init_from and "router_noise" not in overrides and noise_applies and _upcycled(cfg.init_from):
        # the paper continues an upcycled model with Gumbel-sigmoid router noise (§2.5): its copied
        # experts only become different through learning and noise; model.overrides.router_noise=0 to refuse
        overrides["router_noise"] = UPCYCLED_ROUTER_NOISE
    if cfg.aux_routers_from:
        overrides["aux_routers"] = True
    try:
        return preset(cfg.model.preset, ffn=cfg.model.ffn, vocab_size=vocab.size, image_offset=vocab.image_offset,
                      pad_id=vocab.pad_id, match_mod_depth=cfg.model.match_mod_depth, **overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


UPCYCLED_ROUTER_NOISE = 1.0  # the noise scale a run continuing from `moma upcycle` gets unless it sets one


def _upcycled(init_from: str) -> bool:
    """Whether `init_from` is `moma upcycle`'s output (its export.json says so)."""
    info = Path(init_from) / "export.json"
    try:
        return "upcycled" in json.loads(info.read_text())
    except (OSError, ValueError):
        return False  # not a model directory: check_init_source says so, naming it


# settings that change how a model is run or trained, not its weights
RUN_SETTINGS = ("max_seq_len", "moe_dispatch", "router_noise", "router_noise_temperature", "router_rank",
                "router_assign")


def _same_model(key: str, path: str, saved: dict[str, Any], model: ModelConfig, ignore: tuple[str, ...] = ()) -> None:
    mine = model.to_json()
    skip = set(RUN_SETTINGS) | set(ignore)
    differ = sorted(k for k in set(saved) | set(mine) if k not in skip and saved.get(k, mine.get(k)) != mine.get(k))
    if differ:
        what = ", ".join(f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in differ[:4])
        raise ConfigError(f"{key}: {path} holds another model ({what})")


def check_init_source(path: str, model: ModelConfig) -> Path:
    """The model a run starts from (`init_from`, e.g. `moma upcycle`'s output): an export directory
    holding this very model (capacity factor and run settings may differ)."""
    from moma.pipeline.training.export import WEIGHTS, is_export, model_dir_config

    root = Path(path)
    if not is_export(root):
        raise ConfigError(f"init_from: {path} is not a model directory (no {WEIGHTS} / config.json; make one with "
                          f"`moma upcycle` or `moma export`)")
    saved = model_dir_config(root)
    _same_model("init_from", path, saved, model, ignore=("capacity_factor", "aux_routers"))
    return root


def check_aux_source(path: str, model: ModelConfig) -> Path:
    """The checkpoint whose auxiliary routers a run fits: it must exist and hold this very model."""
    from moma.pipeline.training.checkpoint import CheckpointError, find_checkpoint, load_model_states

    try:
        found = find_checkpoint(path, Path(path), verify=False)  # checksums: at setup, a share per rank
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint")
        saved = load_model_states(found[0] / found[1])["moma"]["model"]
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"aux_routers_from: {e}") from None
    spec = model.ffn_spec
    if not spec.mod and (not spec.learned_routing or model.router != "expert_choice"):
        raise ConfigError(f"aux_routers_from: {model.ffn} with {model.router} routing has no expert-choice or "
                          f"mixture-of-depths router to make causal")
    _same_model("aux_routers_from", path, saved, model, ignore=("aux_routers",))
    return found[0] / found[1]


def plan_run(cfg: TrainConfig, world_size: int) -> RunPlan:
    """Resolve and check the whole run; raises ConfigError naming what is wrong."""
    from moma.pipeline.training.metrics import check_logging

    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    check_settings(cfg, world_size)  # every numeric setting's range and every choice, naming its key
    try:
        check_logging(cfg.logging)  # a logger whose package is missing: refused here, not after launch
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.max_steps < 1:
        raise ConfigError("max_steps must be >= 1")
    if cfg.stop_at_step is not None and not 0 < cfg.stop_at_step <= cfg.max_steps:
        raise ConfigError(f"stop_at_step {cfg.stop_at_step} must lie in [1, max_steps {cfg.max_steps}]")
    if cfg.checkpoint.universal not in UNIVERSAL_POLICIES:
        raise ConfigError(f"checkpoint.universal must be one of {UNIVERSAL_POLICIES}, got {cfg.checkpoint.universal!r}")
    if cfg.schedule.decay not in ("linear", "cosine"):
        raise ConfigError(f"schedule.decay must be linear or cosine, got {cfg.schedule.decay!r}")
    vocab = run_vocab(cfg)
    streams = world_size * cfg.data.streams_per_rank
    try:
        resolved = resolve_sources(cfg.data, streams, vocab, "the run's tokenizers")
    except (IdentityMismatchError, ValueError, MomaError) as e:
        raise ConfigError(str(e)) from None
    if cfg.eval.every and not cfg.data.eval_sources:
        raise ConfigError(f"eval.every = {cfg.eval.every} but data.eval_sources is empty: name the held-out shards")
    if cfg.eval.every < 0 or cfg.eval.batches < 1:
        raise ConfigError("eval.every must be >= 0 and eval.batches >= 1")
    if cfg.data.eval_sources:
        try:
            resolve_sources(dataclasses.replace(cfg.data, sources=cfg.data.eval_sources), 1, vocab,
                            "the run's tokenizers")
        except (IdentityMismatchError, ValueError, MomaError) as e:
            raise ConfigError(f"data.eval_sources: {e}") from None
    model = model_config(cfg, vocab)
    if cfg.aux_routers_from:
        check_aux_source(cfg.aux_routers_from, model)
    if cfg.init_from:
        if cfg.aux_routers_from:
            raise ConfigError("init_from and aux_routers_from exclude each other (the auxiliary-router fit loads "
                              "its own model)")
        check_init_source(cfg.init_from, model)
    if world_size % cfg.parallel.ep_size:  # after the model checks: a model mismatch is the first thing to fix
        raise ConfigError(f"parallel.ep_size: world size {world_size} is not a multiple of expert-parallel size "
                          f"{cfg.parallel.ep_size}")
    ds = build_ds_config(cfg, world_size)
    try:
        check_parallel_layout(model, cfg.parallel.ep_size, world_size, zero_stage(ds))
    except ParallelConfigError as e:
        from moma.pipeline.training.memory_plan import working_ep_sizes

        raise ConfigError(f"{e}; layouts that work on {world_size} GPUs: ep_size "
                          f"{', '.join(map(str, working_ep_sizes(model, world_size)))}") from None
    return RunPlan(cfg=cfg, world_size=world_size, vocab=vocab, model=model, ds_config=ds,
                   accounting=count(model, cfg.data.seq_len), manifests=[r.manifest for r in resolved])
