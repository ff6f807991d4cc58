"""`moma train`: the loop every rank runs under the deepspeed launcher, torchrun or srun.

    deepspeed --num_gpus 2 --module moma.pipeline.cli train CONFIG --resume auto

Per step: grad_accum micro-batches (forward, backward, engine.step), then on rank 0 one metrics.jsonl
row: loss (all, text, image: summed over every rank's tokens), learning rate, grad norm, tokens/s,
MFU, expert load per modality group, memory, and a digest of the documents the step saw. A
non-finite loss on any rank skips that micro-batch on all ranks (no backward, no step) and is
counted; too many in a row checkpoint and stop. SIGTERM / SIGINT / SIGUSR1 (preemption, Ctrl-C; to a
rank, a DataLoader worker, the launcher or the whole process group: training/stopping.py) finish the
current step, checkpoint, and exit 0, so a requeued job resumes with --resume auto.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moma.pipeline.loader.loader import PackedLoader
from moma.pipeline.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    fsync_tree,
    gather_checksums,
    install_safe_loading,
    load_model_states,
    load_universal,
    mark_complete,
    new_tag,
    read_rank_states,
    rng_state,
    safe_load,
    save_universal,
    set_rng_state,
    verify_files_collective,
    write_rank_state,
)
from moma.pipeline.training.config import TrainConfig, save_config
from moma.pipeline.training.ds_config import precision
from moma.pipeline.training.engine import (
    build_model,
    expert_group_name,
    expert_parallel_rank,
    init_distributed,
    initialize_engine,
    launch_env,
    routing_for,
)
from moma.pipeline.training.evaluate import evaluate, heldout_batches, progress_line
from moma.pipeline.training.metrics import MetricsWriter, RoutingWatch, expert_load, memory_mb, routing_health
from moma.pipeline.training.run_plan import RunPlan, check_aux_source, plan_run
from moma.pipeline.training.stopping import StopRequest
from moma.tokenizers.fileio import write_json_atomic
from moma.tokenizers.progress import progress as progress_bar
from moma.tokenizers.progress import write as write_progress

EXIT_OK, EXIT_NONFINITE = 0, 3


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then linear decay to min_lr_ratio at max_steps (the paper's) or cosine."""
    s = cfg.schedule

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        progress = min(1.0, (step - s.warmup_steps) / max(1, cfg.max_steps - s.warmup_steps))
        if s.decay == "cosine":
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - s.min_lr_ratio) * progress

    return factor


def _all_reduce(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


@dataclasses.dataclass
class Progress:
    step: int = 0
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: {"text": 0, "image": 0})
    nonfinite_skipped: int = 0


def setup_engine(cfg: TrainConfig, resuming: bool = False) -> tuple[RunPlan, Any, Any, int]:
    """Plan (config errors surface here, before any process group), then process groups, the model
    with this rank's experts, and the DeepSpeed engine: (plan, dist info, engine, ep rank).
    `resuming`: a checkpoint of the run's own will be loaded, so `init_from` is not read."""
    _, world_size, _ = launch_env()
    plan = plan_run(cfg, world_size)
    info = init_distributed()
    ep = cfg.parallel.ep_size
    ep_rank = expert_parallel_rank(ep)
    model = build_model(plan.model, ep_size=ep, seed=cfg.seed, ep_rank=ep_rank, device=info.device,
                        dtype=torch.bfloat16 if precision(plan.ds_config) == "bf16" else torch.float32)
    if cfg.aux_routers_from:
        source = check_aux_source(cfg.aux_routers_from, plan.model)
        damaged = verify_files_collective(source)  # each rank checks a share of its files
        if damaged:
            raise CheckpointError(f"aux_routers_from: refusing a damaged checkpoint: {damaged[0]}")
        freeze_all_but_aux_routers(model, source, ep, ep_rank)
    elif cfg.init_from and not resuming:
        load_init_weights(model, Path(cfg.init_from), ep, ep_rank)
    engine = initialize_engine(model, plan.ds_config, cfg.optim.weight_decay, lr_lambda(cfg))
    return plan, info, engine, ep_rank


def _copy_weights(model: torch.nn.Module, tensor: Any, where: Path, ep: int, ep_rank: int,
                  skip: str | None = None) -> list[torch.nn.Parameter]:
    """Set each parameter (but those whose name holds `skip`) from `tensor(global name)` (None:
    missing); this rank's experts by their global names. Returns the parameters set."""
    from moma.pipeline.training.expert_layout import ExpertLayout

    names = ExpertLayout(ep, ep_rank).global_names(model)
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip and skip in name:
                continue
            value = tensor(names[name])
            if value is None:
                raise CheckpointError(f"{where} lacks {names[name]}: not this model")
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"{where}: {names[name]} has shape {tuple(value.shape)}, the model "
                                      f"{tuple(p.shape)}")
            p.copy_(value.to(p.device, p.dtype))
            done.append(p)
    return done


def freeze_all_but_aux_routers(model: torch.nn.Module, tag_dir: Path, ep: int, ep_rank: int) -> None:
    """The pre-trained weights (this rank's experts by their global names), frozen: no gradient and
    no optimizer state; only the auxiliary routers train."""
    from moma.pipeline.training.export import consolidated_state

    state, _ = consolidated_state(tag_dir)
    for p in _copy_weights(model, state.get, tag_dir, ep, ep_rank, skip="causal_routers"):
        p.requires_grad_(False)


def load_init_weights(model: torch.nn.Module, directory: Path, ep: int, ep_rank: int) -> None:
    """`init_from`: every parameter from the model directory's safetensors, read memory-mapped
    (a rank reads only the tensors it holds)."""
    from moma.pipeline.training.export import open_weights

    with open_weights(directory) as get:  # clean or internal names, one file or shards
        _copy_weights(model, get, directory, ep, ep_rank)


def init_loader_states(directory: Path) -> list[dict[str, Any]] | None:
    """The data position a model directory carries (`moma upcycle`: every source rank's loader
    state), re-split by the loader for this run's world; None: start the data from the beginning."""
    from moma.pipeline.training.upcycle import LOADER_STATES

    path = directory / LOADER_STATES
    return safe_load(path)["states"] if path.exists() else None


def train(cfg: TrainConfig, resume: str | None = None) -> int:
    run_dir, ckpt_dir = Path(cfg.run_dir), cfg.checkpoint_dir
    stop = StopRequest().install()  # before the slow setup: a signal then stops after the first step
    found = find_checkpoint(resume, ckpt_dir, verify=False)  # which one: after the checksums, below
    plan, info, engine, ep_rank = setup_engine(cfg, resuming=found is not None)
    if found is not None:  # every file against `complete`, each rank a share; damaged: the previous one
        found = find_checkpoint(resume, ckpt_dir, check=verify_files_collective)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json_atomic(run_dir / "vocab.json", plan.vocab.to_json())
        write_json_atomic(run_dir / "model.json", plan.model.to_json())

    progress, loader_state = Progress(), None
    if found is not None:
        progress, loader_state = resume_from(engine, plan, found, ep_rank, info.rank)
    elif cfg.init_from:
        loader_state = init_loader_states(Path(cfg.init_from))
        if info.is_main:
            print(f"starting from {cfg.init_from} (weights{' and data position' if loader_state else ''}; "
                  f"fresh optimizer and schedule)", flush=True)

    loader = PackedLoader(cfg.data, batch_size=cfg.parallel.micro_batch, seed=cfg.seed, rank=info.rank,
                          world_size=plan.world_size, vocab=plan.vocab, consumer=f"{run_dir}/config.yaml",
                          state=loader_state)
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    code = _loop(cfg, plan, engine, loader, progress, end, info, ep_rank, stop)
    dist.barrier()
    return code


def resume_from(engine: Any, plan: RunPlan, found: tuple[Path, str], ep_rank: int,
                rank: int) -> tuple[Progress, Any]:
    """Load a checkpoint into `engine`: DeepSpeed's own path on the same layout, the universal copy on
    another; returns the progress counters and the loader state(s) to continue with: this rank's
    own, or every old rank's when the streams are re-split (another world size or worker count)."""
    ckpt_dir, tag = found
    tag_dir = ckpt_dir / tag
    client = load_model_states(tag_dir)["moma"]
    layout = client["layout"]
    old_world = layout["world_size"]
    same = (old_world, layout["ep_size"]) == (plan.world_size, plan.cfg.parallel.ep_size)
    if same:
        install_safe_loading(engine)  # DeepSpeed's own files, without arbitrary unpickling
        engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
    else:
        load_universal(engine, tag_dir, ep_rank)
        engine.lr_scheduler.load_state_dict(client["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
        engine.global_steps = client["step"]
        engine.global_samples = client["step"] * plan.ds_config["train_batch_size"]
    progress = Progress(step=client["step"], tokens=dict(client["tokens"]),
                        nonfinite_skipped=client.get("nonfinite_skipped", 0))
    own = read_rank_states(tag_dir, old_world, [rank])[rank] if same else None
    if own is not None:
        set_rng_state(own["rng"])
    if own is not None and (own["loader"]["per_rank"], own["loader"]["batch_size"]) == \
            (plan.cfg.data.streams_per_rank, plan.cfg.parallel.micro_batch):
        loader_state: Any = own["loader"]
    else:  # re-split (another world, worker count or micro batch): every old rank's loader state
        loader_state = [st["loader"] for _, st in sorted(read_rank_states(tag_dir, old_world).items())]
    if rank == 0:
        how = "same layout" if same else (f"re-sharded from world {old_world} / ep {layout['ep_size']} "
                                          f"to world {plan.world_size} / ep {plan.cfg.parallel.ep_size}")
        print(f"resumed from {tag_dir} at step {progress.step} ({how})", flush=True)
    return progress, loader_state


def _save(cfg: TrainConfig, plan: RunPlan, engine: Any, loader: PackedLoader, progress: Progress, ep_rank: int,
          info: Any, final: bool) -> None:
    """Every rank: DeepSpeed's files, its own loader + RNG state, (the universal copy), fsync; then
    rank 0 marks the checkpoint complete and points `latest` at it. `final`: the last save of this
    launch (the one a resized job resumes from)."""
    from deepspeed.utils import groups

    ckpt_dir = cfg.checkpoint_dir
    tag = [new_tag(ckpt_dir, progress.step) if info.is_main else None]
    dist.broadcast_object_list(tag, src=0)  # one short string, at saves only
    tag_dir = ckpt_dir / tag[0]
    layout = {"world_size": plan.world_size, "ep_size": cfg.parallel.ep_size,
              "zero_stage": plan.ds_config.get("zero_optimization", {}).get("stage", 0)}
    client = {"moma": {
        "step": progress.step, "tokens": progress.tokens, "nonfinite_skipped": progress.nonfinite_skipped,
        "layout": layout, "lr_scheduler": engine.lr_scheduler.state_dict(), "config": cfg.to_json(),
        "vocab": plan.vocab.to_json(), "model": plan.model.to_json()}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag[0], client_state=client, save_latest=False)
    write_rank_state(tag_dir, info.rank, {"loader": loader.state_dict(), "rng": rng_state()})
    universal = cfg.checkpoint.universal == "always" or (final and cfg.checkpoint.universal == "final")
    if universal:
        edp_rank = groups._get_expert_data_parallel_rank(expert_group_name(cfg.parallel.ep_size)) \
            if plan.model.ffn_spec.learned_routing else 0
        save_universal(engine, tag_dir, ep_rank, edp_rank)
    dist.barrier()  # every rank's files are written ...
    files = gather_checksums(tag_dir)  # each rank hashes a share (from the page cache); rank 0 gets all
    if info.local_rank == 0:
        fsync_tree(tag_dir)  # ... and on disk (each node's ranks wrote through its page cache)
    dist.barrier()
    if info.is_main:
        mark_complete(ckpt_dir, tag[0], {"step": progress.step, "layout": layout, "universal": universal,
                                         "files": files},
                      cfg.checkpoint.keep)
    dist.barrier()


def _loop(cfg: TrainConfig, plan: RunPlan, engine: Any, loader: PackedLoader, progress: Progress, end: int,
          info: Any, ep_rank: int, stop: StopRequest | None = None) -> int:
    device, gas = info.device, cfg.parallel.grad_accum
    writer = MetricsWriter(Path(cfg.run_dir), cfg.logging.tensorboard) if info.is_main else None
    watch = RoutingWatch(cfg.logging.no_expert_warn)
    stop = stop or StopRequest().install()
    acc = plan.accounting
    bar = progress_bar(total=end, initial=progress.step, desc="train", disable=not info.is_main,
                       every_s=cfg.logging.progress_seconds)
    batches = iter(loader)
    heldout = heldout_batches(cfg.data, cfg.data.eval_sources, plan.vocab, cfg.parallel.micro_batch,
                              cfg.eval.batches) if cfg.eval.every else []
    in_a_row, code = 0, EXIT_OK
    saved_at = progress.step  # the step of the checkpoint on disk (a resume's own)
    injected = Counter(cfg.debug_nonfinite_at)
    while progress.step < end:
        start = time.perf_counter()
        ce = {"text": 0.0, "image": 0.0}
        toks = {"text": 0, "image": 0}
        keys: list[str] = []
        done = 0
        while done < gas:
            batch = next(batches)
            ids = batch["input_ids"].to(device)
            # routing metadata once per micro-batch for every MoE layer; statistics on logged steps only
            routing = routing_for(engine.module, ids, collect_stats=(progress.step + 1) % cfg.logging.every == 0)
            if cfg.aux_routers_from:
                routing.aux_targets = True  # fit the auxiliary routers to this forward's selections
            out = engine(ids, batch["labels"].to(device), routing=routing)
            loss = out.aux_router_loss if cfg.aux_routers_from else out.loss
            if in_a_row < injected[progress.step + 1]:
                loss = loss * float("nan")  # fault injection (debug_nonfinite_at): exercises the skip path
            finite = _all_reduce([float(torch.isfinite(loss.detach()).all())], device, dist.ReduceOp.MIN)[0]
            if not finite:
                progress.nonfinite_skipped += 1
                in_a_row += 1
                if info.is_main:
                    write_progress(f"step {progress.step + 1}: non-finite loss, micro-batch skipped "
                               f"({in_a_row} in a row, {progress.nonfinite_skipped} in all)")
                if in_a_row > cfg.max_nonfinite_in_a_row:
                    code = EXIT_NONFINITE
                    break
                continue
            engine.backward(loss)
            engine.step()
            done += 1
            for m in ("text", "image"):
                ce[m] += float(out.ce_sum[m])
                toks[m] += int(out.tokens[m])
            keys += batch["doc_keys"]
        if code != EXIT_OK:
            break
        in_a_row = 0
        progress.step += 1
        sums = _all_reduce([ce["text"], ce["image"], toks["text"], toks["image"], float(stop.requested)], device)
        for m, t in zip(("text", "image"), sums[2:4]):
            progress.tokens[m] += int(t)
        seconds = time.perf_counter() - start
        log_step = progress.step % cfg.logging.every == 0
        if log_step:  # every rank sends its documents' digest to rank 0; only logged steps need it
            digests: list[Any] = [None] * plan.world_size
            dist.gather_object(hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16],
                               digests if info.is_main else None, dst=0)
        if info.is_main and log_step:
            n_text, n_image = sums[2], sums[3]
            n = max(n_text + n_image, 1)
            tokens_per_s = plan.tokens_per_step / seconds
            flops = (acc.flops_per_token["text"] * n_text + acc.flops_per_token["image"] * n_image) / n
            row = {
                "step": progress.step, "loss": (sums[0] + sums[1]) / n,
                "loss_text": sums[0] / n_text if n_text else None, "loss_image": sums[1] / n_image if n_image else None,
                "lr": engine.get_lr()[0], "grad_norm": _grad_norm(engine), "tokens_per_s": round(tokens_per_s, 1),
                "mfu": (flops * tokens_per_s / (cfg.logging.peak_flops * plan.world_size)
                        if cfg.logging.peak_flops else None),
                "step_seconds": round(seconds, 4), "tokens_seen": progress.tokens,
                "nonfinite_skipped": progress.nonfinite_skipped, "bad_data": loader.bad_counts(),
                "expert_load": expert_load(engine.module), "routing": routing_health(engine.module),
                "memory_mb": round(memory_mb(device), 1),
                "docs_digest": hashlib.sha1("".join(digests).encode()).hexdigest()[:16],
            }
            if cfg.aux_routers_from:
                row["aux_router_loss"] = float(out.aux_router_loss.detach())
                row["aux_routers"] = aux_router_summary(engine.module)
            writer.write(row)
            warning = watch.check(progress.step, row["routing"])
            if warning:
                write_progress(warning)
            bar.set_postfix(loss=f"{row['loss']:.3f}", text=_fmt(row["loss_text"]), image=_fmt(row["loss_image"]))
        bar.update(1)
        preempted = sums[4] > 0
        if heldout and (progress.step % cfg.eval.every == 0 or progress.step == end):
            _evaluate(cfg, plan, engine, heldout, progress.step, writer, device)
        every = cfg.checkpoint.every  # 0: only at the end of the launch (and at a stop)
        if preempted or progress.step == end or (every and progress.step % every == 0):
            _save(cfg, plan, engine, loader, progress, ep_rank, info, final=preempted or progress.step == end)
            saved_at = progress.step
        if preempted:
            if info.is_main:
                write_progress(f"preemption signal: checkpointed at step {progress.step}, exiting 0 (resume with "
                           f"--resume auto)")
            break
    if code == EXIT_NONFINITE:
        if saved_at != progress.step:  # not twice for one step: that checkpoint is already on disk
            _save(cfg, plan, engine, loader, progress, ep_rank, info, final=True)
        if info.is_main:
            write_progress(f"stopping: more than {cfg.max_nonfinite_in_a_row} non-finite losses in a row at step "
                       f"{progress.step + 1}; checkpointed step {progress.step} (lower the learning rate or inspect "
                       f"the data, then --resume auto)")
    bar.close()
    if writer:
        writer.close()
    return code


def aux_router_summary(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Per layer and group (this rank's last forward with statistics): accuracy, precision, recall."""
    out = {}
    for i, layer in enumerate(getattr(model, "layers", [])):
        found = {**getattr(layer.ffn, "aux_router_stats", {}), **getattr(layer, "aux_router_stats", {})}
        for group, stats in found.items():
            out[f"{i}.{group}"] = {k: round(float(v), 4) for k, v in stats.items()}
    return out


def _heldout_aux_routers(engine: Any, heldout: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The auxiliary routers' decisions on the held-out set against expert choice's, per layer and group."""
    totals: dict[str, dict[str, float]] = {}
    for batch in heldout:
        ids = batch["input_ids"].to(device)
        routing = routing_for(engine.module, ids, collect_stats=True)
        routing.aux_targets = True
        engine(ids, batch["labels"].to(device), routing=routing)
        for key, stats in aux_router_summary(engine.module).items():
            for k, v in stats.items():
                totals.setdefault(key, {}).setdefault(k, 0.0)
                totals[key][k] += v / len(heldout)
    return {key: {k: round(v, 4) for k, v in stats.items()} for key, stats in totals.items()}


def _evaluate(cfg: TrainConfig, plan: RunPlan, engine: Any, heldout: list[dict[str, Any]], step: int,
              writer: MetricsWriter | None, device: torch.device) -> None:
    """The held-out set on every rank (expert choice; causal too when the model has auxiliary routers
    and every expert is local); rank 0 writes one metrics row."""
    def forward(ids: torch.Tensor, labels: torch.Tensor, mode: str) -> Any:
        routing = routing_for(engine.module, ids)
        if routing is not None:
            routing.mode = mode
        return engine(ids, labels, routing=routing)

    modes = ["ec"] + (["causal"] if plan.model.aux_routers else [])
    engine.eval()
    row: dict[str, Any] = {"step": step}
    for mode in modes:
        row["eval" if mode == "ec" else "eval_causal"] = evaluate(forward, heldout, mode, device)
    if cfg.aux_routers_from:
        with torch.no_grad():
            row["eval_aux_routers"] = _heldout_aux_routers(engine, heldout, device)
    engine.train()
    if writer is not None:
        writer.write(row)
        write_progress(progress_line(step, row))  # the causal figure first for an auxiliary-router fit


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
