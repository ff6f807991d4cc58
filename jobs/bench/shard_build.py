"""Benchmark: the whole shard build vs its bare stages on the same inputs.

    .venv/bin/python jobs/bench/shard_build.py --image-tokenizer runs/demo/tokenizers/image \\
        --text-tokenizer runs/demo/tokenizers/text [--coco ../shared/data/coco2017_mini] [--text-mb 20]

Two builds, each with --workers 2, each against the bare stage that bounds it, on the same inputs
and the same two cores:
* COCO mini (both caption files: 239 photos, 1,195 captions, a document per caption, and the 4,841
  val2017 images the JSON lists but the folder lacks, rejected; the sources listed --repeat times, so
  the photos are decoded and encoded that many times) vs the VQ encoder forward on ready tensors;
* a text-only corpus of --text-mb MB of real text (the CPython standard library's sources and the
  embedded plays, as files of ~256 KB) vs tiktoken's batch encode of the same texts.
efficiency = bare stage time / build time (goal >= 0.8). The COCO build runs twice, with JPEG draft
decoding (the default) and without (`jpeg_draft=False`), with the per-image JPEG decode + preprocess
time of each. Leaves the text shards in --out (the loader benchmark reads them) and the COCO shards
beside them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_tokenizer import real_text_documents  # noqa: E402

from moma.pipeline.readers.base import ReaderOptions  # noqa: E402
from moma.pipeline.shards.build import BuildConfig, build  # noqa: E402
from moma.tokenizers.image_preprocess import load_image, to_tensor_batch  # noqa: E402
from moma.tokenizers.image_tokenizer import ImageTokenizer  # noqa: E402
from moma.tokenizers.text import TextTokenizer  # noqa: E402


def write_text_corpus(directory: Path, mb: float) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    docs = real_text_documents(int(mb * 1e6), doc_bytes=256_000)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:05d}.txt").write_text(doc)
    return docs


def bare_vq(tok: ImageTokenizer, images: list[Path], repeat: int) -> float:
    x = to_tensor_batch([load_image(p, tok.resolution) for p in images])
    tok.encode_tensor(x[:64])  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        for i in range(0, len(x), 64):
            tok.encode_tensor(x[i:i + 64])
    return time.perf_counter() - start


def bare_bpe(tok: TextTokenizer, texts: list[str]) -> float:
    start = time.perf_counter()
    tok.encode_batch(texts, num_threads=2)
    return time.perf_counter() - start


def decode_ms(images: list[Path], resolution: int, draft: bool) -> float:
    start = time.perf_counter()
    for p in images:
        load_image(p, resolution, draft=draft)
    return (time.perf_counter() - start) / len(images) * 1e3


def timed_build(sources: list[str], out: Path, args: argparse.Namespace, options: ReaderOptions,
                jpeg_draft: bool = True) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(sources=sources, out=str(out), text_tokenizer=args.text_tokenizer,
                      image_tokenizer=args.image_tokenizer, options=options, num_partitions=8, jpeg_draft=jpeg_draft,
                      max_reject_fraction=1.0)  # the val file lists 5,000 images, the mini folder holds 159
    start = time.perf_counter()
    manifest = build(cfg, workers=args.workers, progress=False)
    return manifest.totals, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-tokenizer", required=True)
    ap.add_argument("--text-tokenizer", required=True)
    ap.add_argument("--coco", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "coco2017_mini"))
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--text-mb", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/shards")
    args = ap.parse_args()

    coco = Path(args.coco)
    coco_json = [coco / "meta" / "captions_val2017_official.json",
                 coco / "meta" / "captions_train2017_cocomini_subset.json"]
    images = sorted((coco / "images").glob("*.jpg"))
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        texts = write_text_corpus(Path(tmp) / "text", args.text_mb)
        coco_sources = [f"coco:{p}" for _ in range(args.repeat) for p in coco_json]
        coco_options = ReaderOptions(coco_images=str(coco / "images"))
        _, coco_no_draft_s = timed_build(coco_sources, out.with_name(out.name + "_coco"), args, coco_options,
                                         jpeg_draft=False)
        coco_totals, coco_s = timed_build(coco_sources, out.with_name(out.name + "_coco"), args, coco_options)
        text_totals, text_s = timed_build([f"text:{Path(tmp) / 'text'}"], out, args, ReaderOptions())

    torch.set_num_threads(2)  # the bare stages get the same two cores
    image_tok = ImageTokenizer.load(args.image_tokenizer)
    vq_s = bare_vq(image_tok, images, args.repeat)
    draft_ms, no_draft_ms = (decode_ms(images, image_tok.resolution, d) for d in (True, False))
    bpe_s = bare_bpe(TextTokenizer.load(args.text_tokenizer), texts)
    mb = sum(len(x.encode()) for x in texts) / 1e6

    def tokens(t: dict) -> int:
        return t["tokens"]["text"] + t["tokens"]["image"]

    print(json.dumps({
        "bench": "shard_build", "workers": args.workers,
        "coco_docs": coco_totals["docs"], "coco_rejected": coco_totals["rejected"],
        "coco_images_encoded": len(images) * args.repeat, "coco_build_s": round(coco_s, 2),
        "coco_docs_per_s": round(coco_totals["docs"] / coco_s, 1),
        "coco_tokens_per_s": round(tokens(coco_totals) / coco_s),
        "bare_vq_s": round(vq_s, 2), "bare_vq_images_per_s": round(len(images) * args.repeat / vq_s, 1),
        "coco_efficiency": round(vq_s / coco_s, 3), "coco_build_no_draft_s": round(coco_no_draft_s, 2),
        "coco_efficiency_no_draft": round(vq_s / coco_no_draft_s, 3),
        "jpeg_decode_ms_draft": round(draft_ms, 3), "jpeg_decode_ms_no_draft": round(no_draft_ms, 3),
        "text_mb": round(mb, 1), "text_docs": text_totals["docs"], "text_build_s": round(text_s, 2),
        "text_tokens_per_s": round(tokens(text_totals) / text_s), "text_mb_per_s": round(mb / text_s, 2),
        "bare_bpe_s": round(bpe_s, 2), "bare_bpe_mb_per_s": round(mb / bpe_s, 2),
        "text_efficiency": round(bpe_s / text_s, 3),
    }))


if __name__ == "__main__":
    main()
