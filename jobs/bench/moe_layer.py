"""Benchmark: forward + backward time per token of one FFN layer, side by side in one process.

    .venv/bin/python jobs/bench/moe_layer.py [--tokens 4096] [--d-model 512] [--hidden 2048]
    .venv/bin/python jobs/bench/moe_layer.py --device cuda --dtype bf16 --peak-tflops 989   # on a GPU

* moma_4t4i: our modality-aware expert-choice layer (4 text + 4 image experts, capacity factor 1:
  on average one expert of `hidden` per token) on DeepSpeed's MOELayer;
* dense: one SwiGLU FFN of the same `hidden` — equal active FLOPs per token;
* deepspeed_topk: DeepSpeed's own MoE layer (TopKGate, top-1, 8 experts of `hidden`, capacity
  factor 1), the same number and size of experts. It drops the tokens that overflow an expert's
  capacity (reported: deepspeed_topk_dropped_fraction), so it computes less than expert choice,
  which processes every slot.
Half of the tokens are image tokens. Prints one JSON line: microseconds per token of each, and
ratio_vs_dense = moma / dense (goal <= 1.10), ratio_vs_deepspeed_topk = moma / deepspeed (goal <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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
    x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    layer(x, is_image).float().pow(2).mean().backward()
    sync()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    d, h, n = args.d_model, args.hidden, args.tokens
    cfg = ModelConfig(vocab_size=1024, image_offset=512, d_model=d, n_heads=8, ffn_hidden=h, ffn="moma_4t4i")
    layers = {"moma_4t4i": GroupedMoEFFN(cfg, ep_size=1), "dense": DenseFFN(d, h),
              "deepspeed_topk": DeepSpeedTopK(d, h, 8)}
    for layer in layers.values():
        layer.to(device=device, dtype=dtype)
    x = torch.randn(1, n, d, device=device, dtype=dtype)
    is_image = (torch.arange(n, device=device) % 2 == 1).view(1, n)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for rep in range(args.repeat + 2):  # two warm-up rounds; the order rotates every round
        order = list(layers)[rep % 3:] + list(layers)[:rep % 3]
        for name in order:
            t = time_layer(layers[name], x, is_image, sync)
            if rep >= 2:
                times[name].append(t)
    us = {k: statistics.median(v) / n * 1e6 for k, v in times.items()}
    flops_per_token = 6 * 3 * d * h  # fwd + bwd of one SwiGLU of `hidden` per token (dense == moma active)
    row = {"bench": "moe_layer", "device": args.device, "dtype": args.dtype, "tokens": n, "d_model": d,
           "hidden": h, "threads": torch.get_num_threads(),
           **{f"{k}_us_per_token": round(v, 3) for k, v in us.items()},
           "deepspeed_topk_dropped_fraction": round(layers["deepspeed_topk"].dropped, 4),
           "ratio_vs_dense": round(us["moma_4t4i"] / us["dense"], 3),
           "ratio_vs_deepspeed_topk": round(us["moma_4t4i"] / us["deepspeed_topk"], 3)}
    if args.peak_tflops:
        row["mfu_moma"] = round(flops_per_token / (us["moma_4t4i"] * 1e-6) / (args.peak_tflops * 1e12), 4)
        row["mfu_dense"] = round(flops_per_token / (us["dense"] * 1e-6) / (args.peak_tflops * 1e12), 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
