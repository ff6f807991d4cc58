"""Benchmark: the whole shard build vs its bare stages on the same inputs.

    .venv/bin/python jobs/bench/shard_build.py --image-tokenizer runs/demo/tokenizers/image \\
        --text-tokenizer runs/demo/tokenizers/text [--coco ../shared/data/coco2017_mini] [--text-mb 20]

Inputs: the COCO mini corpus (both caption files: 239 photos, 1,195 captions, a document per caption;
listed --repeat times as separate sources, so the images are decoded and encoded that many times) and
a text-only corpus of --text-mb MB of real text (the CPython standard library's sources and the
embedded plays, as files of ~256 KB). The build runs with --workers 2. Bare stages, on the same
inputs with the same two cores: the VQ encoder forward on ready image tensors, and tiktoken's batch
encode of the same texts. efficiency = (time of the slowest bare stage) / (build time), goal >= 0.8.
Leaves the shards in --out (the loader benchmark reads them). Prints one JSON line.
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
    with tempfile.TemporaryDirectory() as tmp:
        texts = write_text_corpus(Path(tmp) / "text", args.text_mb)
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        sources = [f"coco:{p}" for _ in range(args.repeat) for p in coco_json] + [f"text:{Path(tmp) / 'text'}"]
        cfg = BuildConfig(sources=sources, out=str(out), text_tokenizer=args.text_tokenizer,
                          image_tokenizer=args.image_tokenizer, options=ReaderOptions(coco_images=str(coco / "images")),
                          num_partitions=8)
        start = time.perf_counter()
        manifest = build(cfg, workers=args.workers, progress=False)
        build_s = time.perf_counter() - start

    torch.set_num_threads(2)
    vq_s = bare_vq(ImageTokenizer.load(args.image_tokenizer), images, args.repeat)
    bpe_s = bare_bpe(TextTokenizer.load(args.text_tokenizer), texts)
    t = manifest.totals
    tokens = t["tokens"]["text"] + t["tokens"]["image"]
    print(json.dumps({
        "bench": "shard_build", "workers": args.workers, "docs": t["docs"], "rejected": t["rejected"],
        "images_encoded": len(images) * args.repeat, "text_mb": round(sum(len(x.encode()) for x in texts) / 1e6, 1),
        "tokens": tokens, "build_s": round(build_s, 2), "docs_per_s": round(t["docs"] / build_s, 1),
        "tokens_per_s": round(tokens / build_s), "bare_vq_s": round(vq_s, 2), "bare_bpe_s": round(bpe_s, 2),
        "bare_vq_images_per_s": round(len(images) * args.repeat / vq_s, 1),
        "bare_bpe_mb_per_s": round(sum(len(x.encode()) for x in texts) / 1e6 / bpe_s, 2),
        "efficiency": round(max(vq_s, bpe_s) / build_s, 3),
    }))


if __name__ == "__main__":
    main()
