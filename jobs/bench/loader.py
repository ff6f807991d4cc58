"""Benchmark: the loader's tokens/s vs a bare tarfile + np.load loop over the same shards; and the
tokens/s the tiny training preset consumes (the margin the loader leaves).

    .venv/bin/python jobs/bench/loader.py --data runs/bench/shards [--workers 2] [--seq-len 256]

Both sides read every document of every shard once (the loader: one epoch, packed into batches of
windows, 2 worker processes; bare: one process, `tarfile` + `np.load` of each tokens.npy). Prints
one JSON line; ratio = loader / bare (goal >= 0.9). The ratio depends on document length: the bare
loop's cost is per document, the loader's mostly per batch (packing, state, worker -> main
transfer), so short documents (captions) favour the loader and book-length ones the bare loop;
run it on both kinds (the shard_build benchmark leaves text shards in DIR and COCO ones in DIR_coco).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader  # noqa: E402
from moma.pipeline.model.config import preset  # noqa: E402
from moma.pipeline.model.transformer import Transformer  # noqa: E402
from moma.pipeline.shards.manifest import Manifest  # noqa: E402


def bare_pass(directory: Path, manifest: Manifest) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for shard in manifest.shards:
        with tarfile.open(directory / shard.name) as tar:
            for member in tar:
                if member.name.endswith(".tokens.npy"):
                    tokens += np.load(io.BytesIO(tar.extractfile(member).read())).size
    return tokens, time.perf_counter() - start


def loader_pass(directory: Path, total: int, workers: int, seq_len: int, batch: int) -> tuple[int, float]:
    loader = PackedLoader(DataConfig(sources=(DataSource(str(directory)),), seq_len=seq_len, num_workers=workers,
                                     shuffle_buffer=1000), batch_size=batch)
    start, tokens = time.perf_counter(), 0
    for b in loader:
        tokens += b["input_ids"].numel()
        if tokens >= total:
            break
    return tokens, time.perf_counter() - start


def training_tokens_per_s(vocab_size: int, image_offset: int, seq_len: int, batch: int, steps: int = 4) -> float:
    """The tiny preset (moma_4t4i) on this machine: forward + backward + AdamW, one process."""
    model = Transformer(preset("tiny", ffn="moma_4t4i", vocab_size=vocab_size, image_offset=image_offset,
                               max_seq_len=seq_len))
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab_size, (batch, seq_len))
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        out = model(ids, ids.roll(-1, 1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return batch * seq_len / (sum(times) / len(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    directory = Path(args.data)
    manifest = Manifest.load(directory)
    total = manifest.totals["tokens"]["text"] + manifest.totals["tokens"]["image"]
    bare_pass(directory, manifest)  # warm the page cache for both sides
    bare_tokens, bare_s = bare_pass(directory, manifest)
    loader_tokens, loader_s = loader_pass(directory, total, args.workers, args.seq_len, args.batch)
    train_tps = training_tokens_per_s(manifest.vocab.size, manifest.vocab.image_offset, args.seq_len, args.batch)
    loader_tps, bare_tps = loader_tokens / loader_s, bare_tokens / bare_s
    print(json.dumps({"bench": "loader", "shards": len(manifest.shards), "docs": manifest.totals["docs"],
                      "tokens": total, "workers": args.workers, "seq_len": args.seq_len, "batch": args.batch,
                      "loader_tokens_per_s": round(loader_tps), "bare_tokens_per_s": round(bare_tps),
                      "ratio": round(loader_tps / bare_tps, 3),
                      "tiny_training_tokens_per_s": round(train_tps),
                      "loader_margin_over_training": round(loader_tps / train_tps, 1)}))


if __name__ == "__main__":
    main()
