"""Benchmark: generation tokens/s with the KV cache and without it (every step recomputes the whole
sequence), side by side, same seed — the outputs must be the same tokens.

    .venv/bin/python jobs/bench/generate.py --model runs/demo/run/export_causal [--new-tokens 128]

Text sampling (temperature 1) after a caption prompt, then one image (its (R/f)^2 codes) after the
same prompt. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from moma.pipeline.generate import SamplingConfig, encode_prompt, load_generator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a `moma export` directory (MoE: with auxiliary routers)")
    ap.add_argument("--prompt", default="a large red circle at the bottom left, on a grey background.")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    gen, text, image = load_generator(args.model)
    row: dict[str, object] = {"bench": "generate", "model": args.model, "ffn": gen.model.cfg.ffn,
                              "routing": gen.mode}
    for kind in ("text", "image"):
        prompt, uncond = encode_prompt(gen.vocab, text, image, args.prompt, generate_image=kind == "image")
        n = args.new_tokens if kind == "text" else (gen.image_codes or 0) + 1
        outs, rates = [], []
        for cache in (True, False):
            sampling = SamplingConfig(max_new_tokens=n, temperature=1.0, seed=7, use_cache=cache)
            start = time.perf_counter()
            out = gen.generate(prompt, sampling, stop_after_image=kind == "image")
            rates.append(len(out) / (time.perf_counter() - start))
            outs.append(out)
        row[kind] = {"prompt_tokens": len(prompt), "new_tokens": len(outs[0]), "same_tokens": outs[0] == outs[1],
                     "tokens_per_s_kv_cache": round(rates[0], 1), "tokens_per_s_no_cache": round(rates[1], 1),
                     "speedup": round(rates[0] / rates[1], 2)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
