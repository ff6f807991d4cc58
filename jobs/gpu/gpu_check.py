"""Training throughput of the paper's presets on one GPU: tokens/s, MFU and peak memory for dense and
moma_4t4i, bf16, seq 4096, the paper's 65,536 vocabulary (random tokens, a quarter of them image
codes), AdamW. One JSON line per (preset, variant). Run by jobs/gpu/gpu_check.sh.

    python jobs/gpu/gpu_check.py --presets 90m,435m --seq-len 4096 [--peak-tflops 989]
    .venv/bin/python jobs/gpu/gpu_check.py --device cpu --presets tiny --seq-len 128 --steps 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from moma.pipeline.model.accounting import count  # noqa: E402
from moma.pipeline.model.config import preset  # noqa: E402
from moma.pipeline.training.engine import build_model  # noqa: E402


def measure(size: str, ffn: str, seq: int, micro: int, steps: int, peak: float,
            device: str = "cuda") -> dict[str, object]:
    cfg = preset(size, ffn=ffn, max_seq_len=seq)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.image_offset, (micro, seq + 1), device=device, generator=g)
    ids[:, seq // 4: seq // 2] = torch.randint(cfg.image_offset, cfg.vocab_size, (micro, seq // 4), device=device,
                                              generator=g)
    times = []
    for step in range(steps + 3):
        sync()
        start = time.perf_counter()
        out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= 3:
            times.append(time.perf_counter() - start)
    tps = micro * seq / (sum(times) / len(times))
    acc = count(cfg, seq)
    flops = (acc.flops_per_token["text"] * 3 + acc.flops_per_token["image"]) / 4  # 3/4 text, 1/4 image
    return {"bench": "gpu_check", "preset": size, "ffn": ffn, "seq_len": seq, "micro_batch": micro,
            "device": torch.cuda.get_device_name() if cuda else device, "tokens_per_s": round(tps),
            "gflop_per_token": round(flops / 1e9, 3), "mfu": round(flops * tps / (peak * 1e12), 4),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
            "total_params_m": round(acc.total_params / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="90m,435m")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (tiny preset, short seq)")
    args = ap.parse_args()
    for size in args.presets.split(","):
        for ffn in ("dense", "moma_4t4i"):
            micro = 4 if size in ("tiny", "90m") else 2
            print(json.dumps(measure(size, ffn, args.seq_len, micro, args.steps, args.peak_tflops, args.device)),
                  flush=True)


if __name__ == "__main__":
    main()
