"""Held-out evaluation of an image tokenizer against the same-budget bicubic baseline.

    moma tokenizer eval-image --tokenizer runs/vq-tiny --images heldout/ --grid recon.png

The baseline spends a comparable bit budget by hand: a bicubic downsample to g x g RGB pixels
(g = the code grid side, 24 bits each) and a bicubic upsample back to R x R.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from moma.tokenizers.image_metrics import bicubic_baseline, codebook_stats, image_grid, psnr, ssim
from moma.tokenizers.image_preprocess import ImageError, ImageSource, load_image
from moma.tokenizers.image_tokenizer import ImageTokenizer


def evaluate_image_tokenizer(tok: ImageTokenizer, sources: Sequence[ImageSource],
                             grid_path: str | os.PathLike[str] | None = None, grid_count: int = 8) -> dict[str, Any]:
    images, skipped = [], []
    for src in sources:
        try:
            images.append(load_image(src, tok.resolution))
        except ImageError as e:
            skipped.append(str(e))
    if not images:
        raise ValueError(f"none of the {len(sources)} evaluation images could be read")
    originals = np.stack(images)
    codes = np.concatenate([tok.encode(originals[i:i + 64]) for i in range(0, len(originals), 64)])
    recon = tok.decode(codes)
    base = bicubic_baseline(originals, tok.cfg.grid)
    report = {
        "images": len(images), "skipped": len(skipped), "resolution": tok.resolution,
        "tokens_per_image": tok.tokens_per_image, "tokenizer": tok.identity.short(),
        "psnr": round(float(psnr(originals, recon).mean()), 3), "ssim": round(float(ssim(originals, recon).mean()), 4),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in codebook_stats(codes, tok.cfg.num_codes).items()},
        "bits_per_image": tok.tokens_per_image * math.log2(tok.cfg.num_codes),
        "bicubic_psnr": round(float(psnr(originals, base).mean()), 3),
        "bicubic_ssim": round(float(ssim(originals, base).mean()), 4),
        "bicubic_bits_per_image": tok.cfg.grid ** 2 * 24,
    }
    if grid_path:
        n = min(grid_count, len(images))
        image_grid([originals[:n], recon[:n], base[:n]]).save(grid_path)
        report["grid"] = str(grid_path)
    return report
