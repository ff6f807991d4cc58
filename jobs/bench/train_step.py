"""Benchmark: the whole training step (forward, backward, ZeRO-2 step, loader) in tokens/s for dense,
moe_8x, moma_1t1i, moma_4t4i and moma_4t4i_mod, side by side, beside the paper's Table 2 (throughput
vs dense: 1t1i -6 %, 8x -9 %, 4t4i -17 %, 4t4i + MoD -31 %), and MoD's own overhead.

    .venv/bin/python jobs/bench/train_step.py --data runs/demo [--presets tiny,90m] [--steps 8]

Each variant runs `moma train` under the deepspeed launcher on 2 ranks (CPU: gloo, fp32; expert
parallel 2 for the learned-routing variants, 1 otherwise), the same data, seq_len and batch; the
figure is the median tokens/s of the steps after the first two (metrics.jsonl). --data: a `moma
demo --out` directory (its tokenizers and shards). Prints one JSON line.

MoD overhead (router, top-k, gather/scatter, the scaled residual): one MoD layer of moma_4t4i_mod,
forward + backward on a rank's micro-batch, minus the same block run on the kept tokens alone (the
work MoD means to do), on one thread; its share of the measured MoD step is that times the MoD
layers over the step time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import tempfile
from pathlib import Path

import yaml

from moma.pipeline.launch import deepspeed_command, launcher_env

VARIANTS = ("dense", "moe_8x", "moma_1t1i", "moma_4t4i", "moma_4t4i_mod")
PAPER_VS_DENSE = {"moe_8x": -0.09, "moma_1t1i": -0.06, "moma_4t4i": -0.17, "moma_4t4i_mod": -0.31}
SEQ_LEN = 256


def mod_overhead_ms(preset: str, micro: int, vocab: tuple[int, int], repeats: int = 10) -> dict[str, float]:
    """One MoD layer: (router + selection + gather/scatter + block on the kept tokens) vs the block on
    the kept tokens alone, forward + backward, median ms on one thread."""
    import time

    import torch

    from moma.pipeline.model.config import preset as model_preset
    from moma.pipeline.model.transformer import Block, rope_tables

    torch.set_num_threads(1)
    text, image = vocab
    cfg = model_preset(preset, ffn="moma_4t4i_mod", vocab_size=text + image, image_offset=text, max_seq_len=SEQ_LEN)
    torch.manual_seed(0)
    block = Block(cfg, ep_size=1, index=0)
    ids = torch.randint(0, text + image, (micro, SEQ_LEN))
    is_image = ids >= text
    x = torch.randn(micro, SEQ_LEN, cfg.d_model, requires_grad=True)
    cos, sin = rope_tables(cfg.head_dim, SEQ_LEN, cfg.rope_theta)
    k = max(1, math.ceil(cfg.mod_capacity * SEQ_LEN))  # what the MoD layer keeps per sequence
    keep = torch.arange(k).expand(micro, k)
    xs = x.detach()[:, :k].clone().requires_grad_(True)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            fn().float().sum().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:]) * 1e3

    whole = timed(lambda: block(x, is_image, cos, sin))
    kept = timed(lambda: block._block(xs, is_image[:, :k], cos, sin, None, None, positions=keep))
    return {"mod_layer_ms": round(whole, 2), "kept_block_ms": round(kept, 2), "overhead_ms": round(whole - kept, 2)}


def tokens_per_s(preset: str, ffn: str, data: Path, steps: int, micro: int, out: Path) -> float:
    learned = ffn not in ("dense", "moma_1t1i")
    cfg = {
        "run_dir": str(out / f"{preset}_{ffn}"), "max_steps": steps,
        "data": {"sources": [{"path": str(data / "shards" / "captions"), "weight": 0.85},
                             {"path": str(data / "shards" / "text"), "weight": 0.15}],
                 "seq_len": SEQ_LEN, "num_workers": 1},
        "tokenizers": {"text": str(data / "tokenizers" / "text"), "image": str(data / "tokenizers" / "image")},
        "model": {"preset": preset, "ffn": ffn},
        "schedule": {"warmup_steps": 1},
        "parallel": {"ds_config": "zero2_fp32", "ep_size": 2 if learned else 1, "micro_batch": micro,
                     "grad_accum": 1},
        "checkpoint": {"every": 10 ** 6, "universal": "never"},
    }
    path = out / f"{preset}_{ffn}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run(deepspeed_command(2, "train", str(path)), check=True, env=launcher_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / f"{preset}_{ffn}" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r.get("step", 0) > 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `moma demo --out` directory")
    ap.add_argument("--presets", default="tiny,90m")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    row: dict[str, object] = {"bench": "train_step", "ranks": 2, "seq_len": SEQ_LEN, "paper_vs_dense": PAPER_VS_DENSE}
    # the shards' vocabulary: text ranks + controls below image_offset, then the image codes
    manifest = json.loads((Path(args.data) / "shards" / "captions" / "manifest.json").read_text())
    vocab_layout = manifest["vocab"]["layout"]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            micro = 8 if preset == "tiny" else 2
            tps = {ffn: tokens_per_s(preset, ffn, Path(args.data), args.steps, micro, Path(tmp)) for ffn in VARIANTS}
            row[preset] = {"micro_batch": micro, **{f"{k}_tokens_per_s": round(v) for k, v in tps.items()},
                           **{f"{k}_vs_dense": round(v / tps["dense"] - 1, 3) for k, v in tps.items() if k != "dense"}}
            lo, hi = vocab_layout["image"]
            mod = mod_overhead_ms(preset, micro, (lo, hi - lo))
            from moma.pipeline.model.config import preset as model_preset

            layers = sum(model_preset(preset, ffn="moma_4t4i_mod").is_mod_layer(i)
                         for i in range(model_preset(preset).n_layers))
            step_ms = 1e3 * micro * SEQ_LEN * 2 / tps["moma_4t4i_mod"]  # 2 ranks' tokens per step
            row[preset]["mod_overhead"] = {**mod, "mod_layers": layers,
                                           "share_of_step": round(mod["overhead_ms"] * layers / step_ms, 3)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
