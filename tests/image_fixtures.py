"""Image files in every awkward form, written by the tests themselves (imported by several test modules)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(size: tuple[int, int] = (120, 80), seed: int = 0) -> Image.Image:
    """A smooth colourful RGB picture (gradients + a disc), not flat, so resizes are visible."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, min(w, h) / 4
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    base[disc] = rng.uniform(0, 255, 3)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def write_awkward_images(d: Path) -> dict[str, Path]:
    """One file per awkward case; returns name -> path."""
    d.mkdir(parents=True, exist_ok=True)
    base = photo_like()
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = d / name
        files[name].write_bytes(data)

    put("good.jpg", jpeg_bytes(base))
    whole = jpeg_bytes(photo_like(seed=1))
    put("truncated.jpg", whole[:len(whole) // 2])  # header fine, pixel data cut
    put("truncated_header.jpg", whole[:300])
    put("zero.jpg", b"")
    put("notimage.jpg", b"this is plain text, not a JPEG\n" * 10)
    put("cmyk.jpg", jpeg_bytes(base.convert("CMYK")))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    put("rotated.jpg", jpeg_bytes(base, exif=exif.tobytes()))
    buf = io.BytesIO()
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white
    rgba.save(buf, format="PNG")
    put("transparent.png", buf.getvalue())
    buf = io.BytesIO()
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(buf, format="PNG", transparency=0)
    put("palette_alpha.png", buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray((np.arange(80 * 120).reshape(80, 120) * 6).astype(np.uint16)).save(buf, format="PNG")
    put("gray16.png", buf.getvalue())
    buf = io.BytesIO()
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 200, 30)).save(buf, format="PNG")
    put("one_pixel.png", buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3), (200, 10, 10)).save(buf, format="PNG")
    put("very_wide.png", buf.getvalue())
    put("bomb.png", png_header_only(50_000, 50_000))
    return files
