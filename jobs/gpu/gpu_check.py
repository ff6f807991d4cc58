"""Training throughput of the paper's presets on one GPU through `moma train`'s own path: the model
built by engine.build_model in bf16, the DeepSpeed engine from the zero1_bf16 preset (fp32
accumulation and reduction, one rank), routing_for + engine forward/backward/step as train.py runs
them. Dense and moma_4t4i, seq 4096, the paper's 65,536 vocabulary (random tokens, a quarter of them
image codes). One JSON line per (preset, variant): tokens/s, MFU, peak memory (GB) and the dry run's
plan (GB, pipeline/training/memory_plan.py) next to it. Run by jobs/gpu/gpu_check.sh.

    python jobs/gpu/gpu_check.py --presets 90m,435m --seq-len 4096 [--peak-tflops 989]
    DS_ACCELERATOR=cpu .venv/bin/python jobs/gpu/gpu_check.py --device cpu --presets tiny --seq-len 128 --steps 1
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from moma.pipeline.model.accounting import count  # noqa: E402
from moma.pipeline.model.config import preset  # noqa: E402
from moma.pipeline.training.config import TrainConfig, from_dict  # noqa: E402
from moma.pipeline.training.ds_config import build_ds_config  # noqa: E402
from moma.pipeline.training.engine import build_model, init_distributed, initialize_engine, routing_for  # noqa: E402

PRESET = "zero1_bf16"


def memory_estimate(cfg: object, micro: int, seq: int, ds_config: dict) -> dict[str, float]:
    """The dry run's plan for this layout (GB): its items, and the total without the CUDA context /
    NCCL allowance, which is what torch.cuda.max_memory_allocated can be compared with."""
    from moma.pipeline.training.memory_plan import plan_memory

    plan = plan_memory(cfg, world_size=1, ep_size=1, micro_batch=micro, seq_len=seq, zero_stage=1, bf16=True,
                       ds_config=ds_config)
    items = {k: round(v / 1e9, 2) for k, v in plan.items.items()}
    return {**items, "total_without_overhead": round(plan.total_gb - items["overhead"], 2)}


def measure(size: str, ffn: str, seq: int, micro: int, steps: int, peak: float, device: torch.device) -> dict:
    cfg = preset(size, ffn=ffn, max_seq_len=seq)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(cfg, device=device, dtype=torch.bfloat16)
    run = from_dict(TrainConfig, {"parallel": {"ds_config": PRESET, "micro_batch": micro, "grad_accum": 1},
                                  "optim": {"lr": 1e-4}})
    ds_config = build_ds_config(run, world_size=1)
    engine = initialize_engine(model, ds_config)
    build_s = time.perf_counter() - t0
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.image_offset, (micro, seq + 1), device=device, generator=g)
    ids[:, seq // 4: seq // 2] = torch.randint(cfg.image_offset, cfg.vocab_size, (micro, seq // 4), device=device,
                                              generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    times = []
    for step in range(steps + 3):  # three warm-up steps (allocator, kernels, optimizer states)
        sync()
        start = time.perf_counter()
        out = engine(x, y, routing=routing_for(engine.module, x))
        engine.backward(out.loss)
        engine.step()
        sync()
        if step >= 3:
            times.append(time.perf_counter() - start)
    tps = micro * seq / (sum(times) / len(times))
    acc = count(cfg, seq)
    flops = (acc.flops_per_token["text"] * 3 + acc.flops_per_token["image"]) / 4  # 3/4 text, 1/4 image
    result = {"bench": "gpu_check", "preset": size, "ffn": ffn, "seq_len": seq, "micro_batch": micro,
              "ds_config": PRESET, "device": torch.cuda.get_device_name() if cuda else str(device),
              "tokens_per_s": round(tps), "gflop_per_token": round(flops / 1e9, 3),
              "mfu": round(flops * tps / (peak * 1e12), 4), "build_s": round(build_s, 1),
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
              "dry_run_gb": memory_estimate(cfg, micro, seq, ds_config),
              "total_params_m": round(acc.total_params / 1e6, 1), "loss": round(float(out.loss.detach()), 4)}
    del engine, model, out
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="90m,435m")
    ap.add_argument("--ffn", default="dense,moma_4t4i")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (tiny preset, short seq)")
    args = ap.parse_args()
    info = init_distributed("gloo" if args.device == "cpu" else None)  # one rank, as `moma train` sets it up
    for size in args.presets.split(","):
        for ffn in args.ffn.split(","):
            micro = 4 if size in ("tiny", "90m") else 2
            print(json.dumps(measure(size, ffn, args.seq_len, micro, args.steps, args.peak_tflops, info.device)),
                  flush=True)


if __name__ == "__main__":
    main()
