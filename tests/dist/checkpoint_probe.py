"""Worker for test_training_distributed.py: load a `moma train` checkpoint into a freshly built
engine (any layout) and either (a) write the engine's logits on fixed batches, or (b) write the
universal copy of what was loaded, to compare with what was saved.

    deepspeed --num_gpus 2 tests/dist/checkpoint_probe.py --config run.yaml --checkpoint CKPT --logits OUT
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from moma.pipeline.training.checkpoint import find_checkpoint, save_universal  # noqa: E402
from moma.pipeline.training.config import load_config  # noqa: E402
from moma.pipeline.training.train import resume_from, setup_engine  # noqa: E402


def fixed_batches(vocab_size: int, image_offset: int, n: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    out = []
    for i in range(n):
        ids = torch.randint(0, image_offset, (2, seq), generator=g)
        ids[:, 4 + i:20 + i] = torch.randint(image_offset, vocab_size, (2, 16), generator=g)
        out.append(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--logits", default=None, help="write each rank's logits on fixed batches here")
    ap.add_argument("--universal", default=None, help="write the loaded state's universal copy here")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    plan, info, engine, ep_rank = setup_engine(cfg)
    resume_from(engine, plan, find_checkpoint(args.checkpoint, cfg.checkpoint_dir), ep_rank, info.rank)
    if args.logits:
        engine.eval()
        batches = fixed_batches(plan.model.vocab_size, plan.model.image_offset, plan.world_size, cfg.data.seq_len)
        with torch.no_grad():
            logits = engine(batches[info.rank]).logits
        os.makedirs(args.logits, exist_ok=True)
        torch.save({"ids": batches[info.rank], "logits": logits}, os.path.join(args.logits, f"rank{info.rank}.pt"))
    if args.universal:
        from deepspeed.utils import groups

        from moma.pipeline.training.engine import expert_group_name

        edp = groups._get_expert_data_parallel_rank(expert_group_name(cfg.parallel.ep_size))
        save_universal(engine, Path(args.universal), ep_rank, edp)


if __name__ == "__main__":
    main()
