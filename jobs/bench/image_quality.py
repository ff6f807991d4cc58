"""Benchmark: the tiny image tokenizer trained for --minutes on real photos, measured on held-out ones,
side by side with the same-budget baseline done by hand (bicubic to 8 x 8 RGB and back up).

    .venv/bin/python jobs/bench/image_quality.py --minutes 15 --out runs/bench/vq_coco [--grid docs/x.png]

Photos: the COCO mini corpus, split by image id: id % 5 == 0 held out (50 photos), the rest (189)
trained on (random crops and flips). Reported at R = 64: PSNR, SSIM, codebook usage and perplexity
for the tokenizer (64 codes of 10 bits = 640 bits per image) and for the baseline (64 RGB pixels =
1,536 bits). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moma.tokenizers.image_eval import evaluate_image_tokenizer
from moma.tokenizers.vq_train import ImageTrainConfig, train_image_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "coco2017_mini"
                                            / "images"))
    ap.add_argument("--quantizer", choices=["vq", "fsq"], default="vq")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="1e-3: the best of the rates tried on these photos")
    ap.add_argument("--crop-min", type=float, default=ImageTrainConfig.crop_min,
                    help="training crops: random squares of this fraction of the shorter side, up to all of it")
    ap.add_argument("--out", default="runs/bench/vq_coco")
    ap.add_argument("--grid", default=None, help="also write the held-out reconstruction grid here")
    args = ap.parse_args()
    files = sorted(Path(args.images).glob("*.jpg"))
    held = [f for f in files if int(f.stem) % 5 == 0]
    train = [f for f in files if int(f.stem) % 5 != 0]
    cfg = ImageTrainConfig(preset="tiny", overrides={"quantizer": args.quantizer}, max_minutes=args.minutes,
                           batch_size=args.batch_size, lr=args.lr, crop_min=args.crop_min, grid_every=10_000)
    tok = train_image_tokenizer(train, args.out, cfg, eval_sources=held, progress=False)
    report = evaluate_image_tokenizer(tok, held, grid_path=args.grid or Path(args.out) / "heldout_grid.png")
    print(json.dumps({"bench": "image_quality", "train_images": len(train), "heldout_images": len(held),
                      "minutes": args.minutes, "quantizer": args.quantizer, "lr": args.lr,
                      "batch_size": args.batch_size, "crop_min": args.crop_min, **report}))


if __name__ == "__main__":
    main()
