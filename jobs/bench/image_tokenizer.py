"""Benchmark: image tokenizer throughput, side by side in one run.

    .venv/bin/python jobs/bench/image_tokenizer.py --tokenizer runs/demo/tokenizers/image [--workers 1]

* bare: encoder + quantizer forward on ready [N, 3, R, R] tensors, batches of 64;
* full: JPEG bytes -> codes: decode + preprocess in --workers processes, the encoder in this one
  (BatchImageEncoder, the path the shard builder takes);
* decode: codes -> pixels;
* JPEG decode + preprocess per image, one process, with the decoder's draft (reduced-size) mode and
  without it, and the full path without it (ratio_no_draft).
Images: the COCO mini photos (real JPEGs, 333-640 px), --repeat times. ratio = full / bare (goal
>= 0.7 on 2 cores). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moma.tokenizers.image_encode import BatchImageEncoder
from moma.tokenizers.image_preprocess import ImageError, load_image, to_tensor_batch
from moma.tokenizers.image_tokenizer import ImageTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "coco2017_mini"
                                            / "images"))
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    tok = ImageTokenizer.load(args.tokenizer)
    files = sorted(Path(args.images).glob("*.jpg"))
    jpegs = [f.read_bytes() for f in files] * args.repeat
    n = len(jpegs)

    x = to_tensor_batch([load_image(f, tok.resolution) for f in files])
    x = x.repeat(args.repeat, 1, 1, 1)
    tok.encode_tensor(x[: args.batch])  # warm-up
    start = time.perf_counter()
    codes = torch.cat([tok.encode_tensor(x[i:i + args.batch]) for i in range(0, n, args.batch)])
    bare = n / (time.perf_counter() - start)

    def full_path(draft: bool) -> tuple[float, int]:
        with BatchImageEncoder(tok, workers=args.workers, batch_size=args.batch, draft=draft) as enc:
            list(enc.encode(jpegs[: args.batch]))  # start the worker pool outside the timing
            start = time.perf_counter()
            results = list(enc.encode(jpegs))
            return n / (time.perf_counter() - start), sum(isinstance(r, ImageError) for r in results)

    full, errors = full_path(draft=True)
    full_no_draft, _ = full_path(draft=False)

    def decode_ms(draft: bool) -> float:
        start = time.perf_counter()
        for f in jpegs[: len(files)]:
            load_image(f, tok.resolution, draft=draft)
        return (time.perf_counter() - start) / len(files) * 1e3

    draft_ms, no_draft_ms = decode_ms(True), decode_ms(False)

    start = time.perf_counter()
    for i in range(0, n, args.batch):
        tok.decode(codes[i:i + args.batch].numpy())
    decode = n / (time.perf_counter() - start)
    print(json.dumps({"bench": "image_tokenizer", "tokenizer": tok.identity.short(), "resolution": tok.resolution,
                      "images": n, "workers": args.workers, "threads": torch.get_num_threads(), "errors": errors,
                      "bare_encode_images_per_s": round(bare, 1), "full_path_images_per_s": round(full, 1),
                      "ratio": round(full / bare, 3), "full_path_no_draft_images_per_s": round(full_no_draft, 1),
                      "ratio_no_draft": round(full_no_draft / bare, 3),
                      "jpeg_decode_ms_draft": round(draft_ms, 3), "jpeg_decode_ms_no_draft": round(no_draft_ms, 3),
                      "decode_images_per_s": round(decode, 1)}))


if __name__ == "__main__":
    main()
