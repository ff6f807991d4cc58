"""Worker for test_moe_distributed.py: one model, fixed micro-batches, every ZeRO stage asked for.

Launched as 2 ranks (deepspeed launcher, expert parallel 2: rank 0 holds experts 0-1 of each group,
rank 1 experts 2-3) or as 1 process (expert parallel 1, both micro-batches through gradient
accumulation). Micro-batch 0 is text only, micro-batch 1 mostly image: the ranks' modality mixes
differ, so expert-choice capacity agreement is exercised on every step. Writes, per ZeRO stage,
logits and loss of the first forward, gradients after the first backward (stage 0), and all
parameters after a few optimizer steps, under *global* parameter names.

    deepspeed --num_gpus 2 tests/dist/ep_equivalence.py --ep 2 --cases expert_choice:0 expert_choice:2 --out DIR
"""

from __future__ import annotations

import argparse
import os

import torch

from moma.pipeline.training.engine import (build_model, configure_accelerator, expert_parallel_rank,
                                           init_distributed, initialize_engine)

configure_accelerator()

from moma.pipeline.model.config import ModelConfig  # noqa: E402
from moma.pipeline.model.transformer import global_param_name  # noqa: E402

VOCAB, IMAGE_OFFSET, SEQ, MICRO = 300, 200, 32, 2


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    text = torch.randint(0, IMAGE_OFFSET, (MICRO, SEQ + 1), generator=g)
    mixed = torch.randint(0, IMAGE_OFFSET, (MICRO, SEQ + 1), generator=g)
    mixed[:, 4:28] = torch.randint(IMAGE_OFFSET, VOCAB, (MICRO, 24), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in (text, mixed)]


def model_config(ffn: str, router: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, image_offset=IMAGE_OFFSET, d_model=32, n_layers=2, n_heads=2,
                       ffn_hidden=64, ffn=ffn, router=router, capacity_factor=1.0, max_seq_len=SEQ,
                       z_loss_weight=1e-4)


def global_tensors(model: torch.nn.Module, ep_rank: int, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    local_counts = {p: m.num_local_experts for p, m in model.named_modules() if hasattr(m, "num_local_experts")}
    out = {}
    for name, t in values.items():
        out[global_param_name(name, ep_rank, local_counts.get(name.split(".deepspeed_moe.", 1)[0]))] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, required=True)
    ap.add_argument("--cases", nargs="+", default=["expert_choice:0"], help="ROUTER:ZERO_STAGE ...")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ffn", default="moma_4t4i")
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = ap.parse_args()

    dist = init_distributed()
    ep_rank = expert_parallel_rank(args.ep)
    batches = micro_batches()
    mine = batches if dist.world_size == 1 else [batches[dist.rank]]
    for case in args.cases:
        router, stage_str = case.split(":")
        stage = int(stage_str)
        model = build_model(model_config(args.ffn, router), ep_size=args.ep, seed=7, ep_rank=ep_rank)
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": len(mine),
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "weight_decay": 0.0, "torch_adam": True}},
            "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 9,
        }
        engine = initialize_engine(model, ds_config)
        record: dict[str, object] = {"rank": dist.rank, "ep_rank": ep_rank}
        for step in range(args.steps):
            for i, (x, y) in enumerate(mine):
                out = engine(x, y, return_logits=True)
                if step == 0:
                    micro_index = i if dist.world_size == 1 else dist.rank
                    record[f"logits{micro_index}"] = out.logits.detach().clone()
                    record[f"loss{micro_index}"] = out.loss.detach().clone()
                engine.backward(out.loss)
                if step == 0 and stage == 0 and engine.is_gradient_accumulation_boundary():
                    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                             if p.grad is not None}
                    record["grads"] = global_tensors(engine.module, ep_rank, grads)
                engine.step()
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        record["params"] = global_tensors(engine.module, ep_rank, params)
        record["stats"] = {k: {s: v.clone() for s, v in g.last_stats.items()}
                           for k, g in engine.module.moe_gates().items()}
        os.makedirs(args.out, exist_ok=True)
        torch.save(record, os.path.join(args.out, f"{router}_zero{stage}_rank{dist.rank}.pt"))
        del engine


if __name__ == "__main__":
    main()
