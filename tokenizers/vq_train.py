"""Train an image tokenizer: reconstruction + quantizer loss, random-crop augmentation, checkpoints.

    moma tokenizer train-image --images DIR --preset tiny --max-minutes 15 --out runs/vq-tiny
    torchrun --nproc_per_node 8 -m moma.pipeline.cli tokenizer train-image ...   # DDP on GPUs

Writes into --out: ``checkpoints/step_*.pt`` (resumable: rerun the same command), ``metrics.jsonl``,
``recon_step*.png`` grids (originals above reconstructions) and, at the end, the tokenizer itself
(``image_tokenizer.json`` + ``model.safetensors``). The learning rate follows warmup then cosine decay
over the training *progress*: the larger of steps done / --steps and minutes spent / --max-minutes,
so a time-budgeted run anneals properly and ends cleanly with a final checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from moma.tokenizers.image_metrics import codebook_stats, image_grid
from moma.tokenizers.image_preprocess import (
    ImageError,
    ImageSource,
    decode_rgb,
    from_tensor_batch,
    square_resize,
    to_tensor_batch,
)
from moma.tokenizers.image_tokenizer import ImageTokenizer, preset_config, write_checkpoint
from moma.tokenizers.progress import progress as progress_bar
from moma.tokenizers.quantizers import VectorQuantizer
from moma.tokenizers.vq_model import VQModel


@dataclasses.dataclass
class ImageTrainConfig:
    preset: str = "tiny"
    # VQConfig fields, typed against VQConfig by moma.pipeline.config_parsing (`--set FIELD=VALUE`)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict,
                                                  metadata={"fields_of": "moma.tokenizers.vq_model:VQConfig",
                                                            "exclude": ()})
    steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 32
    # Measured on the tiny preset: flat synthetic pictures train best at 3e-4 (19.5 dB after 300 steps,
    # 16.5 at 1e-3); COCO photos at 1e-3 (19.35 dB after 4 min, 18.3 at 3e-4). Between the two:
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.0
    recon_loss: str = "l1+l2"  # "l1" | "l2" | "l1+l2"
    crop_min: float = 0.6  # random squares of 60-100 % of the shorter side, plus flips
    restart_every: int = 20  # VQ: check for dead codes this often ...
    dead_after: int = 100  # ... and re-seed the ones unused for this many steps
    restart_until: float = 0.8  # no restarts in the last 20 % of training: let the codebook settle
    log_every: int = 10
    checkpoint_every: int = 500
    grid_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.steps and not self.max_minutes:
            raise ValueError("give --steps or --max-minutes (or both): training needs an end")
        if self.recon_loss not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"recon_loss must be l1, l2 or l1+l2, got {self.recon_loss!r}")


class CropDataset(torch.utils.data.Dataset):
    """Images decoded once (at the size the crops need) and cut into random squares on demand."""

    def __init__(self, images: list[Image.Image], resolution: int) -> None:
        self.images = images
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, float, float, float, bool]) -> torch.Tensor:
        idx, frac, fx, fy, flip = key
        arr = square_resize(self.images[idx], self.resolution, crop=(frac, fx, fy))
        if flip:
            arr = arr[:, ::-1]
        return torch.from_numpy(arr.copy())  # PIL's buffer is read-only


class CropSampler(torch.utils.data.Sampler):
    """Endless (index, crop fraction, x, y, flip) keys from a seeded generator."""

    def __init__(self, n: int, crop_min: float, seed: int) -> None:
        self.n, self.crop_min = n, crop_min
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[int, float, float, float, bool]]:
        while True:
            idx = torch.randint(self.n, (1,), generator=self.gen).item()
            frac, fx, fy, flip = torch.rand(4, generator=self.gen).tolist()
            yield int(idx), self.crop_min + (1 - self.crop_min) * frac, fx, fy, flip < 0.5


def decode_training_images(sources: Sequence[ImageSource], min_side: int,
                           progress: bool = True) -> tuple[list[Image.Image], list[str]]:
    """Decode every source once, shrunk so its shorter side is `min_side`; bad ones are reported."""
    images, rejected = [], []
    for src in progress_bar(sources, desc="decoding images", disable=not progress):
        try:
            img = decode_rgb(src, min_side)
        except ImageError as e:
            rejected.append(str(e))
            continue
        scale = min_side / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
        images.append(img)
    return images, rejected


def _lr_factor(progress: float, step: int, cfg: ImageTrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _recon_loss(rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(rec, x)
    if kind == "l2":
        return F.mse_loss(rec, x)
    return F.l1_loss(rec, x) + F.mse_loss(rec, x)


class _Dist:
    """Rank/world of a torchrun launch (or a single process)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def train_image_tokenizer(sources: Sequence[ImageSource], out_dir: str | os.PathLike[str], cfg: ImageTrainConfig,
                          eval_sources: Sequence[ImageSource] = (), progress: bool = True) -> ImageTokenizer:
    """Train (or resume, if --out holds checkpoints) and return the final tokenizer."""
    out = Path(out_dir)
    env = _Dist()
    vq_cfg = preset_config(cfg.preset, **cfg.overrides)
    torch.manual_seed(cfg.seed)
    model = VQModel(vq_cfg).to(env.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    step, elapsed_before = 0, 0.0
    existing = _checkpoints(out)
    if existing:
        ckpt = torch.load(existing[-1], map_location="cpu", weights_only=True)  # tensors + plain containers
        if ckpt["config"] != vq_cfg.to_json():
            raise ValueError(f"{existing[-1]} was trained with another architecture; use a new --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if isinstance(model.quantize, VectorQuantizer):
            model.quantize.steps_unused.copy_(ckpt["steps_unused"])
        step, elapsed_before = int(ckpt["step"]), float(ckpt["elapsed"])
        if env.main:
            print(f"resuming from {existing[-1]} (step {step}, {elapsed_before / 60:.1f} min done)")

    min_side = math.ceil(vq_cfg.resolution / cfg.crop_min)
    images, rejected = decode_training_images(sources, min_side, progress=progress and env.main)
    if env.main:
        for r in rejected[:20]:
            print(f"skipped image: {r}")
    if not images:
        raise ValueError(f"none of the {len(sources)} training images could be read")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if env.world > 1 else model
    sampler = CropSampler(len(images), cfg.crop_min, seed=cfg.seed + 7919 * env.rank + 104729 * step)
    loader = iter(torch.utils.data.DataLoader(CropDataset(images, vq_cfg.resolution), batch_size=cfg.batch_size,
                                              sampler=sampler, num_workers=cfg.num_workers))
    grid_src = list(eval_sources[:8]) or list(sources[:8])
    grid_images = [square_resize(decode_rgb(s, vq_cfg.resolution), vq_cfg.resolution) for s in grid_src
                   if _readable(s)]

    max_seconds = cfg.max_minutes * 60 if cfg.max_minutes else None
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "a") if env.main else None
    start = time.perf_counter()
    bar = progress_bar(total=cfg.steps, initial=step, desc="vq train", disable=not (progress and env.main))
    window_codes: list[torch.Tensor] = []
    last_log, restarted = time.perf_counter(), 0

    def progress_now() -> float:
        elapsed = elapsed_before + time.perf_counter() - start
        return max(step / cfg.steps if cfg.steps else 0.0, elapsed / max_seconds if max_seconds else 0.0)

    while progress_now() < 1.0:
        batch = next(loader)
        x = batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(env.device)
        lr = cfg.lr * _lr_factor(progress_now(), step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        rec, q_loss, codes, latent = ddp(x)
        recon = _recon_loss(rec, x, cfg.recon_loss)
        loss = recon + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        window_codes.append(codes.detach().flatten().cpu())
        if isinstance(model.quantize, VectorQuantizer) and step % cfg.restart_every == 0 and \
                progress_now() < cfg.restart_until:
            restarted += _restart_dead_codes(model.quantize, latent, cfg.dead_after, env)
        bar.update(1)
        if env.main and step % cfg.log_every == 0:
            now = time.perf_counter()
            stats = codebook_stats(torch.cat(window_codes).numpy(), vq_cfg.num_codes)
            row = {"step": step, "loss": loss.detach().item(), "recon": recon.detach().item(),
                   "q_loss": float(q_loss.detach()),
                   "lr": lr, "img_per_s": cfg.batch_size * env.world * cfg.log_every / (now - last_log),
                   "codebook_usage": stats["usage"], "perplexity": stats["perplexity"], "restarted": restarted,
                   "elapsed_min": (elapsed_before + now - start) / 60}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", usage=f"{stats['usage']:.2f}")
            window_codes, last_log, restarted = [], now, 0
        if env.main and grid_images and step % cfg.grid_every == 0:
            _write_grid(model, grid_images, out / f"recon_step{step:06d}.png")
        if env.main and step % cfg.checkpoint_every == 0:
            _save_checkpoint(out, model, opt, vq_cfg, step, elapsed_before + time.perf_counter() - start, cfg)
    bar.close()
    elapsed = elapsed_before + time.perf_counter() - start
    tok = ImageTokenizer(model.cpu(), name=cfg.name or f"{vq_cfg.quantizer}-{cfg.preset}")
    if env.main:
        _save_checkpoint(out, model, opt, vq_cfg, step, elapsed, cfg)
        if grid_images:
            _write_grid(model, grid_images, out / "recon_final.png")
        tok.save(out, extra={"training": {**dataclasses.asdict(cfg), "steps_done": step, "minutes": elapsed / 60,
                                          "images": len(images), "rejected": len(rejected)}})
        metrics.close()
        print(f"trained {tok.identity.short()} for {step} steps ({elapsed / 60:.1f} min, {len(images)} images, "
              f"{len(rejected)} rejected) -> {out}")
    if env.world > 1:
        dist.barrier()
    return tok


def _readable(src: ImageSource) -> bool:
    try:
        decode_rgb(src, 8)
        return True
    except ImageError:
        return False


def _restart_dead_codes(quantizer: VectorQuantizer, latent: torch.Tensor, dead_after: int, env: _Dist) -> int:
    if env.world > 1:
        # a code used on any rank is alive; rank 0 re-seeds, everyone takes its codebook
        dist.all_reduce(quantizer.steps_unused, op=dist.ReduceOp.MIN)
    n = quantizer.restart_dead_codes(latent, dead_after) if env.main else 0
    if env.world > 1:
        dist.broadcast(quantizer.embedding.weight.data, src=0)
        dist.broadcast(quantizer.steps_unused, src=0)
    return n


@torch.no_grad()
def _write_grid(model: VQModel, originals: list[np.ndarray], path: Path) -> None:
    model.eval()
    x = to_tensor_batch(originals).to(next(model.parameters()).device)
    rec, _, _, _ = model(x)
    grid = image_grid([np.stack(originals), from_tensor_batch(rec)])
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)


def _save_checkpoint(out: Path, model: VQModel, opt: torch.optim.Optimizer, vq_cfg: Any, step: int, elapsed: float,
                     cfg: ImageTrainConfig) -> None:
    payload = {"config": vq_cfg.to_json(), "model": model.state_dict(), "optimizer": opt.state_dict(),
               "step": step, "elapsed": elapsed, "name": cfg.name or f"{vq_cfg.quantizer}-{cfg.preset}",
               "steps_unused": getattr(model.quantize, "steps_unused", torch.zeros(0))}
    write_checkpoint(out / "checkpoints" / f"step_{step:08d}.pt", payload)
    for old in _checkpoints(out)[:-cfg.keep_checkpoints]:
        old.unlink()

