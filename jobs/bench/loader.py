"""Benchmark: the loader's tokens/s vs a bare tarfile + np.load loop over the same shards; and the
tokens/s the tiny training preset consumes (the margin the loader leaves).

    .venv/bin/python jobs/bench/loader.py --data runs/bench/shards [--workers 2] [--seq-len 256] [--repeat 3]

Both sides read every document of every shard once (the loader: one epoch, packed into batches of
windows, 2 worker processes; bare: one process, `tarfile` + `np.load` of each tokens.npy). Prints
one JSON line; ratio = loader / bare (goal >= 0.9). The ratio depends on document length: the bare
loop's cost is per document, the loader's mostly per batch (packing, state, worker -> main
transfer), so short documents (captions) favour the loader and book-length ones the bare loop;
run it on both kinds (the shard_build benchmark leaves text shards in DIR and COCO ones in DIR_coco).

Shard verification (`data.verify_shards`: each stream hashes a shard as it first opens it): the
same loader pass with it on, side by side with it off (`--repeat` alternating passes each, the
best of each kept: the machine is shared): verify_cost_wall = 1 - verified / plain tokens/s, and
verify_cost_cpu = verified / plain CPU seconds - 1 (workers included); the bare sha256 speed over the
shards (`sha256_mb_per_s`, one process, per CPU second) and verify_cost_hashing = the CPU seconds of
hashing every shard once over the plain pass's (the steadiest figure on a busy machine).

Batch quality, over the first epoch of one stream (workers 0), from what the batches say:
* rows_sharing_a_document: the share of batch rows whose tokens come from a document that another
  row of the same batch also holds (one long document filling whole batches: near 1);
* order_rank_correlation: Spearman's rank correlation between the order documents are delivered in
  and their order in the build (shard by shard): 0 for a real shuffle, 1 for none.
Another checkout's loader (e.g. the one before a change) is measured with the same script by putting
it first on the path: `PYTHONPATH=/tmp/old_moma .venv/bin/python jobs/bench/loader.py ...` where
/tmp/old_moma/moma/{pipeline,tokenizers,ds_configs} link to that checkout's folders.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import resource
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from moma.pipeline.training.engine import configure_accelerator

configure_accelerator()

from moma.pipeline.loader.loader import DataSource, PackedLoader  # noqa: E402

try:
    from moma.pipeline.loader.loader import DataConfig
except ImportError:  # an older checkout (see the module docstring)
    DataConfig = None
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


def make_loader(directory: Path, workers: int, seq_len: int, batch: int, seed: int = 0,
                verify: bool = False) -> PackedLoader:
    if DataConfig is not None:
        extra = {"verify_shards": True} if verify else {}  # an older checkout lacks the field
        return PackedLoader(DataConfig(sources=(DataSource(str(directory)),), seq_len=seq_len, num_workers=workers,
                                       shuffle_buffer=1000, **extra), batch_size=batch, seed=seed)
    else:  # an older checkout: LoaderConfig held the batch size and the seed
        from moma.pipeline.loader.loader import LoaderConfig

        return PackedLoader(LoaderConfig(sources=(DataSource(str(directory)),), seq_len=seq_len, batch_size=batch,
                                         num_workers=workers, shuffle_buffer=1000, seed=seed))


def build_order(directory: Path, manifest: Manifest) -> tuple[dict[str, int], dict[str, int]]:
    """Each document's position in the build (shards in manifest order) and its length."""
    from moma.pipeline.shards.inspect import iter_samples

    order, length = {}, {}
    for shard in manifest.shards:
        for key, tokens, _ in iter_samples(directory / shard.name):
            order[f"0:{key}"] = len(order)
            length[f"0:{key}"] = int(tokens.size)
    return order, length


def batch_quality(directory: Path, manifest: Manifest, seq_len: int, batch: int) -> dict[str, float]:
    """rows_sharing_a_document and order_rank_correlation over one epoch of a single stream."""
    order, length = build_order(directory, manifest)
    loader = make_loader(directory, 0, seq_len, batch, seed=1)
    queues: dict[int, list[list]] = {}  # token stream -> [[key, tokens left], ...]
    delivered: list[str] = []
    shared_rows = rows = 0
    for b in loader:
        per_row = "doc_rows" in b  # one packer per row (its own token stream), or one for the whole batch
        for i, key in enumerate(b["doc_keys"]):
            queues.setdefault(b["doc_rows"][i] if per_row else 0, []).append([key, length[key]])
            delivered.append(key)
        holders = []
        for row in range(b["input_ids"].shape[0]):
            q, need, touched = queues[row if per_row else 0], seq_len + 1, set()
            while need > 0 and q:
                take = min(need, q[0][1])
                touched.add(q[0][0])
                q[0][1] -= take
                need -= take
                if q[0][1] == 0 and need > 0:
                    q.pop(0)
            if q and q[0][1] == 0:
                q.pop(0)
            holders.append(touched)
        for row, touched in enumerate(holders):
            rows += 1
            others = set().union(*(h for j, h in enumerate(holders) if j != row))
            shared_rows += bool(touched & others)
        if len(set(delivered)) >= len(order):
            break
    first = list(dict.fromkeys(delivered))[:len(order)]
    ranks = np.array([order[k] for k in first], dtype=np.float64)
    spearman = float(np.corrcoef(np.argsort(np.argsort(ranks)), np.arange(len(ranks)))[0, 1])
    return {"rows_sharing_a_document": round(shared_rows / max(rows, 1), 4),
            "order_rank_correlation": round(spearman, 4)}


def startup_seconds(tmp: Path, vocab, n_shards: int = 100_000, world: int = 64, workers: int = 4) -> dict[str, float]:
    """Start-up of one rank at 10^5 shards: the loader built, then resumed from all 64 x 4 streams'
    states onto 32 x 4 (a re-split), without reading a shard."""
    from moma.pipeline.shards.writer import ShardInfo

    shards = [ShardInfo(name=f"data-{i:06d}.tar", docs=100, text_tokens=10_000, image_tokens=0, bytes=0,
                        sha256="0") for i in range(n_shards)]
    Manifest(vocab=vocab, shards=shards, build={"settings": {}}, totals={}).save(tmp)
    cfg = DataConfig(sources=(DataSource(str(tmp)),), seq_len=4096, num_workers=workers)
    start = time.perf_counter()
    loaders = [PackedLoader(cfg, 8, rank=r, world_size=world) for r in (0,)]
    built = time.perf_counter() - start
    states = [{**loaders[0].state_dict(), "rank": r} for r in range(world)]
    start = time.perf_counter()
    PackedLoader(cfg, 8, rank=0, world_size=world // 2, state=states)
    resplit = time.perf_counter() - start
    return {"startup_100k_shards_s": round(built, 3), "resplit_100k_shards_64x4_to_32x4_s": round(resplit, 3)}


def loader_pass(directory: Path, total: int, workers: int, seq_len: int, batch: int,
                verify: bool = False) -> tuple[int, float]:
    loader = make_loader(directory, workers, seq_len, batch, verify=verify)
    start, tokens = time.perf_counter(), 0
    for b in loader:
        tokens += b["input_ids"].numel()
        if tokens >= total:
            break
    return tokens, time.perf_counter() - start


def sha256_mb_per_s(directory: Path, manifest: Manifest) -> float:
    """Bare hashing speed over the shards (warm page cache), one process, per CPU second."""
    start, size = time.process_time(), 0
    for shard in manifest.shards:
        with open(directory / shard.name, "rb") as f:
            hashlib.file_digest(f, "sha256")
        size += (directory / shard.name).stat().st_size
    return size / 1e6 / (time.process_time() - start)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def verify_cost(directory: Path, total: int, workers: int, seq_len: int, batch: int, repeat: int
                ) -> dict[str, float]:
    """The loader pass with and without data.verify_shards, alternating: best tokens/s of `repeat`
    each (wall clock), and the least CPU seconds per pass (workers included; on a shared machine the
    steadier figure)."""
    best = {False: 0.0, True: 0.0}
    cpu = {False: float("inf"), True: float("inf")}
    for _ in range(repeat):
        for verify in (False, True):
            gc.collect()
            before = cpu_seconds()
            tokens, seconds = loader_pass(directory, total, workers, seq_len, batch, verify)
            gc.collect()  # the pass's DataLoader iterator goes, its workers are joined: their CPU time counts
            cpu[verify] = min(cpu[verify], cpu_seconds() - before)
            best[verify] = max(best[verify], tokens / seconds)
    manifest = Manifest.load(directory)
    rate = sha256_mb_per_s(directory, manifest)
    mb = sum((directory / s.name).stat().st_size for s in manifest.shards) / 1e6
    return {"loader_tokens_per_s_best": round(best[False]), "loader_verified_tokens_per_s_best": round(best[True]),
            "verify_cost_wall": round(1 - best[True] / best[False], 4),
            "loader_cpu_s": round(cpu[False], 2), "loader_verified_cpu_s": round(cpu[True], 2),
            "verify_cost_cpu": round(cpu[True] / cpu[False] - 1, 4),
            "sha256_mb_per_s": round(rate, 1),
            "verify_cost_hashing": round(mb / rate / cpu[False], 4)}  # every shard hashed once: its share of the CPU


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
    ap.add_argument("--startup", action="store_true", help="also time start-up and re-split at 10^5 shards")
    ap.add_argument("--repeat", type=int, default=3, help="passes with and without shard verification (best kept)")
    args = ap.parse_args()
    directory = Path(args.data)
    manifest = Manifest.load(directory)
    total = manifest.totals["tokens"]["text"] + manifest.totals["tokens"]["image"]
    bare_pass(directory, manifest)  # warm the page cache for both sides
    bare_tokens, bare_s = bare_pass(directory, manifest)
    loader_tokens, loader_s = loader_pass(directory, total, args.workers, args.seq_len, args.batch)
    train_tps = training_tokens_per_s(manifest.vocab.size, manifest.vocab.image_offset, args.seq_len, args.batch)
    loader_tps, bare_tps = loader_tokens / loader_s, bare_tokens / bare_s
    quality = batch_quality(directory, manifest, args.seq_len, args.batch)
    verification = verify_cost(directory, total, args.workers, args.seq_len, args.batch, args.repeat) \
        if args.repeat > 0 and DataConfig is not None and "verify_shards" in DataConfig.__dataclass_fields__ else {}
    extra = {}
    if args.startup:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            extra = startup_seconds(Path(tmp), manifest.vocab)
    print(json.dumps({"bench": "loader", "shards": len(manifest.shards), "docs": manifest.totals["docs"],
                      "tokens": total, "workers": args.workers, "seq_len": args.seq_len, "batch": args.batch,
                      "loader_tokens_per_s": round(loader_tps), "bare_tokens_per_s": round(bare_tps),
                      "ratio": round(loader_tps / bare_tps, 3),
                      "tiny_training_tokens_per_s": round(train_tps),
                      "loader_margin_over_training": round(loader_tps / train_tps, 1), **verification, **quality,
                      **extra}))


if __name__ == "__main__":
    main()
