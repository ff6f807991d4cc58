"""Look inside a shard directory: totals, per-shard stats, and sample documents decoded back into
text and pictures (a PNG with each document's text beside its images).

    moma shards inspect shards/ --samples 6 --png samples.png
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from moma.pipeline.shards.assemble import Tokenizers
from moma.pipeline.shards.manifest import Manifest
from moma.pipeline.shards.npy import load_npy
from moma.pipeline.shards.tar_reader import tar_samples
from moma.tokenizers.vocab import Vocab


def iter_samples(tar_path: Path) -> Iterator[tuple[str, np.ndarray, bytes]]:
    """(key, tokens, json bytes) of each sample in one of our tars (the loader's tar reader)."""
    with open(tar_path, "rb") as f:
        for key, parts in tar_samples(f, read=("tokens.npy", "json")):
            if parts.get("tokens.npy") is not None and parts.get("json") is not None:
                yield key, load_npy(parts["tokens.npy"]), parts["json"]


def split_document(tokens: np.ndarray, vocab: Vocab) -> list[tuple[str, np.ndarray]]:
    """A token array -> [("text", ids) | ("image", codes)] in order (BOS/EOS dropped)."""
    parts: list[tuple[str, np.ndarray]] = []
    ids = tokens.astype(np.int64)
    i, text_start = 0, 0
    while i < len(ids):
        if ids[i] == vocab.boi_id:
            end = i + 1
            while end < len(ids) and ids[end] != vocab.eoi_id:
                end += 1
            parts.append(("text", ids[text_start:i]))
            parts.append(("image", vocab.ids_to_image_codes(ids[i + 1:end])))
            i = text_start = end + 1
        else:
            i += 1
    parts.append(("text", ids[text_start:]))
    controls = {vocab.bos_id, vocab.eos_id}
    return [(k, v[~np.isin(v, list(controls))] if k == "text" else v) for k, v in parts
            if k == "image" or len(v[~np.isin(v, list(controls))])]


def summary(manifest: Manifest, directory: Path) -> str:
    t = manifest.totals
    lines = [f"{directory}: {len(manifest.shards)} shards, {t['docs']} docs, {t['tokens']['text']} text + "
             f"{t['tokens']['image']} image tokens; {t['rejected']} of {t['inputs']} inputs rejected "
             f"{t['rejects_by_reason']}", manifest.vocab.describe(),
             f"{'shard':22} {'docs':>7} {'text tok':>10} {'image tok':>10} {'MB':>8}  sha256"]
    for s in manifest.shards:
        lines.append(f"{s.name:22} {s.docs:7d} {s.text_tokens:10d} {s.image_tokens:10d} {s.bytes / 1e6:8.2f}  "
                     f"{s.sha256[:16]}")
    return "\n".join(lines)


def render_samples(directory: Path, manifest: Manifest, tokenizers: Tokenizers, count: int,
                   png: Path | None) -> list[str]:
    """Decode the first `count` documents (spread over the shards); optionally draw them."""
    manifest.check_tokenizers(tokenizers.vocab, directory, "the tokenizers given to inspect")
    vocab = tokenizers.vocab
    texts, rows = [], []
    per_shard = max(1, count // max(len(manifest.shards), 1))
    for shard in manifest.shards:
        for j, (key, tokens, _) in enumerate(iter_samples(directory / shard.name)):
            if j >= per_shard or len(texts) >= count:
                break
            parts = split_document(tokens, vocab)
            shown, pictures = [], []
            for kind, ids in parts:
                if kind == "text":
                    shown.append(tokenizers.text.decode(ids.tolist()))
                else:
                    shown.append(f"[image {len(pictures) + 1}: {ids.size} codes]")
                    if tokenizers.image is not None and ids.size == tokenizers.image.tokens_per_image:
                        pictures.append(tokenizers.image.decode(ids[None])[0])
            texts.append(f"{key}: {''.join(shown)}")
            rows.append((texts[-1], pictures))
        if len(texts) >= count:
            break
    if png is not None and rows:
        _draw(rows, png)
    return texts


def _draw(rows: list[tuple[str, list[np.ndarray]]], png: Path, text_width: int = 420, cell: int = 128) -> None:
    font = ImageFont.load_default()
    heights = [max(cell, 14 * len(textwrap.wrap(t, 64)[:12]) + 8) for t, _ in rows]
    width = text_width + cell * max((len(p) for _, p in rows), default=1) + 8
    canvas = Image.new("RGB", (width, sum(heights) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    y = 4
    for (text, pictures), h in zip(rows, heights):
        for k, line in enumerate(textwrap.wrap(text, 64)[:12]):
            draw.text((6, y + 4 + 14 * k), line, fill="black", font=font)
        for j, pic in enumerate(pictures):
            canvas.paste(Image.fromarray(pic).resize((cell - 4, cell - 4), Image.Resampling.NEAREST),
                         (text_width + j * cell, y))
        draw.line((0, y + h - 2, width, y + h - 2), fill=(220, 220, 220))
        y += h
    canvas.save(png)
