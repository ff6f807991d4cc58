"""Benchmark: forward + backward time per token of one FFN layer, side by side in one run.

    .venv/bin/python jobs/bench/moe_layer.py [--tokens 4096] [--d-model 512] [--hidden 1280] [--ep2]
    .venv/bin/python jobs/bench/moe_layer.py --device cuda --dtypes bf16 --peak-tflops 989   # on a GPU

One process, for each of --dtypes (fp32, bf16):
* moma_4t4i: our modality-aware expert-choice layer (4 text + 4 image experts, capacity factor 1:
  on average one expert of `hidden` per token), moe.py's dispatch (each expert runs its routed rows);
* moma_4t4i_deepspeed_dispatch: the same layer and weights through DeepSpeed's MOELayer;
* dense: one SwiGLU FFN of the same `hidden` — equal active FLOPs per token;
* deepspeed_topk: DeepSpeed's own MoE layer (TopKGate, top-1, 8 experts of `hidden`, capacity
  factor 1), the same number and size of experts. It drops the tokens that overflow an expert's
  capacity (reported: deepspeed_topk_dropped_fraction), so it computes less than expert choice,
  which processes every slot.
Half of the tokens are image tokens. With --ep2, the same on 2 gloo ranks with expert parallelism 2
and an uneven mix (rank 0 text only, rank 1 three quarters image): time per token of both dispatches,
and executed expert FLOPs (rows each expert computed) against accounted (capacity factor x one expert
per token) — the DeepSpeed dispatch computes ep x max_r k_r rows per expert, ours sum_r k_r.
Prints one JSON line: microseconds per token of each, ratio_vs_dense = moma / dense (goal <= 1.10),
ratio_vs_deepspeed_topk = moma / deepspeed (goal <= 1.0), per dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Any

import torch

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from deepspeed.moe.layer import MoE  # noqa: E402

from moma.pipeline.model.config import ModelConfig  # noqa: E402
from moma.pipeline.model.ffn import DenseFFN, GroupedMoEFFN, SwiGLU  # noqa: E402


class DeepSpeedTopK(torch.nn.Module):
    def __init__(self, d: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.moe = MoE(hidden_size=d, expert=SwiGLU(d, hidden), num_experts=experts, ep_size=1, k=1,
                       capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, use_rts=False)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        out, _, counts = self.moe(x)
        n, e = x.shape[0] * x.shape[1], counts.numel()
        capacity = -(-n // e)  # ceil(n / e * capacity factor 1)
        self.dropped = float((counts - capacity).clamp(min=0).sum()) / n  # top-1 tokens past capacity
        return out


def time_layer(layer: torch.nn.Module, x: torch.Tensor, is_image: torch.Tensor, sync) -> float:
    layer.zero_grad(set_to_none=True)  # as a training step does: gradients are written, not accumulated
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    layer(x, is_image).float().pow(2).mean().backward()
    sync()
    return time.perf_counter() - start


def one_process(args: argparse.Namespace, dtype_name: str) -> dict[str, float]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    d, h, n = args.d_model, args.hidden, args.tokens
    cfg = ModelConfig(vocab_size=1024, image_offset=512, d_model=d, n_heads=8, ffn_hidden=h, ffn="moma_4t4i")
    moma = GroupedMoEFFN(cfg, ep_size=1)
    reference = GroupedMoEFFN(dataclasses.replace(cfg, moe_dispatch="deepspeed"), ep_size=1)
    reference.load_state_dict(moma.state_dict())
    layers = {"moma_4t4i": moma, "moma_4t4i_deepspeed_dispatch": reference, "dense": DenseFFN(d, h),
              "deepspeed_topk": DeepSpeedTopK(d, h, 8)}
    for layer in layers.values():
        layer.to(device=device, dtype=dtype)
    x = torch.randn(1, n, d, device=device, dtype=dtype)
    is_image = (torch.arange(n, device=device) % 2 == 1).view(1, n)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for rep in range(args.repeat + 2):  # two warm-up rounds; the order rotates every round
        order = list(layers)[rep % len(layers):] + list(layers)[:rep % len(layers)]
        for name in order:
            t = time_layer(layers[name], x, is_image, sync)
            if rep >= 2:
                times[name].append(t)
    us = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
    flops_per_token = 6 * 3 * d * h  # fwd + bwd of one SwiGLU of `hidden` per token (dense == moma active)
    row = {**{f"{k}_us_per_token": round(v, 3) for k, v in us.items()},
           "deepspeed_topk_dropped_fraction": round(layers["deepspeed_topk"].dropped, 4),
           "ratio_vs_dense": round(us["moma_4t4i"] / us["dense"], 3),
           "ratio_vs_deepspeed_topk": round(us["moma_4t4i"] / us["deepspeed_topk"], 3),
           "ratio_deepspeed_dispatch_vs_dense": round(us["moma_4t4i_deepspeed_dispatch"] / us["dense"], 3)}
    if args.peak_tflops:
        row["mfu_moma"] = round(flops_per_token / (us["moma_4t4i"] * 1e-6) / (args.peak_tflops * 1e12), 4)
        row["mfu_dense"] = round(flops_per_token / (us["dense"] * 1e-6) / (args.peak_tflops * 1e12), 4)
    return row


def _ep2_rank(rank: int, port: int, args: argparse.Namespace, results: Any) -> None:
    """One of 2 gloo ranks: moma_4t4i with ep 2 under both dispatches on an uneven text/image mix."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from moma.pipeline.training.engine import AllToAll, expert_group_name, expert_parallel_rank, init_distributed

    init_distributed()
    ep_rank = expert_parallel_rank(2)
    import torch.distributed as dist
    from deepspeed.utils import groups

    from moma.pipeline.model.routing import ec_capacity, routing_info

    d, h, n = args.d_model, args.hidden, args.tokens
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, image_offset=512, d_model=d, n_heads=8, ffn_hidden=h, ffn="moma_4t4i")
    out: dict[str, float] = {}
    ids = torch.randint(0, 512, (1, n))
    if rank == 1:  # three quarters image tokens here; rank 0: text only
        ids[:, : 3 * n // 4] += 512
    group = groups._get_expert_parallel_group(expert_group_name(2))
    routing = routing_info(ids, 512, None, ["text", "image"])
    mine = torch.tensor([routing.counts["text"][0], routing.counts["image"][0]])
    every = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(every, mine, group=group)
    routing.counts = {"text": [int(e[0]) for e in every], "image": [int(e[1]) for e in every]}
    routing.ep_rank = ep_rank
    x = torch.randn(1, n, d)
    for dispatch in ("moma", "deepspeed"):
        layer = GroupedMoEFFN(dataclasses.replace(cfg, moe_dispatch=dispatch), ep_size=2)
        for m in layer.modules():
            if hasattr(m, "set_deepspeed_parallelism"):
                m.set_deepspeed_parallelism()
        layer.exchange = AllToAll(group) if dispatch == "moma" else None
        times = []
        for rep in range(args.repeat + 2):
            layer.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            xr = x.detach().requires_grad_(True)
            layer(xr, ids >= 512, routing).pow(2).mean().backward()
            dist.barrier()
            if rep >= 2:
                times.append(time.perf_counter() - start)
        out[f"ep2_{dispatch}_us_per_token"] = statistics.median(times) / n * 1e6
    # executed vs accounted expert rows (FLOPs are 6 x 3 d h per row for either), over both ranks
    accounted = sum(routing.counts["text"]) + sum(routing.counts["image"])  # capacity factor 1: one expert each
    executed = {"moma": 0, "deepspeed": 0}
    for g in ("text", "image"):
        ks = [ec_capacity(c, 4, 1.0) for c in routing.counts[g]]
        executed["moma"] += 4 * sum(ks)  # 4 experts in the group, each its sum_r k_r rows
        executed["deepspeed"] += 4 * 2 * max(max(ks), 1)  # each expert: ep x the agreed capacity
    out.update({f"ep2_{k}_executed_over_accounted_flops": v / accounted for k, v in executed.items()})
    results.put((rank, json.dumps(out)))


def ep2(args: argparse.Namespace) -> dict[str, float]:
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ep2_rank, args=(r, port, args, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    rows = [json.loads(got[r]) for r in (0, 1)]
    out = {k: round(max(r[k] for r in rows), 3) for k in rows[0]}  # the slower rank sets the pace
    out["ep2_ratio_moma_vs_deepspeed_dispatch"] = round(out["ep2_moma_us_per_token"]
                                                        / out["ep2_deepspeed_us_per_token"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--ep2", action="store_true", help="also on 2 gloo ranks, expert parallel 2, uneven mix")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    args = ap.parse_args()
    row: dict[str, Any] = {"bench": "moe_layer", "device": args.device, "tokens": args.tokens,
                           "d_model": args.d_model, "hidden": args.hidden, "threads": torch.get_num_threads()}
    for dtype in args.dtypes.split(","):
        row[dtype] = one_process(args, dtype)
    if args.ep2:
        row.update(ep2(args))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
