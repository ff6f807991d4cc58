"""Reconstruction and codebook metrics for image tokenizers: PSNR, SSIM, usage, perplexity."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images [N, H, W, 3], peak 255."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004: gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03), channel mean."""
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double()
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).outer(g / g.sum()).expand(3, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, g, groups=3)  # 'valid' windows only, as the reference implementation

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def codebook_stats(codes: np.ndarray, num_codes: int) -> dict[str, float]:
    """Share of the codebook used and perplexity (exp entropy) of the code histogram."""
    counts = np.bincount(codes.reshape(-1).astype(np.int64), minlength=num_codes).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "codes_used": int((counts > 0).sum())}


def bicubic_baseline(images: np.ndarray, size: int) -> np.ndarray:
    """The same-budget-by-hand baseline: bicubic downsample to size x size RGB, and back up."""
    out = []
    r = images.shape[1]
    for img in images:
        small = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)
        out.append(np.asarray(small.resize((r, r), Image.Resampling.BICUBIC)))
    return np.stack(out)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> Image.Image:
    """Rows of uint8 [N, R, R, 3] images -> one PIL image (white padding)."""
    n, r = rows[0].shape[0], rows[0].shape[1]
    canvas = np.full((len(rows) * (r + pad) + pad, n * (r + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (r + pad), pad + j * (r + pad)
            canvas[y:y + r, x:x + r] = img
    return Image.fromarray(canvas)
