"""The shard build: sources -> documents -> token arrays -> WebDataset tars + manifest.

    moma shards build --source coco:captions.json --source text:books/ \\
        --text-tokenizer tok/text --image-tokenizer tok/vq --out shards/ --workers 2

Unit of parallel work: partition i of n. The readers' units (files, row groups, JSON slices) are
listed in a deterministic order and cut into groups of consecutive units by weights known before
any record is read (shards/groups.py); partition i takes every n-th group, whole, and writes its
tars into ``OUT/.staging/part-i/`` (a tar never spans two groups) and, last, ``done.json``. A rerun
skips partitions with ``done.json`` and redoes any other from scratch, so a build killed at any
moment (even SIGKILL) and rerun ends with exactly the shards of an uninterrupted build. The same
partition runs as a local process (--workers) or as a SLURM array task (--partition i
--num-partitions n; then `moma shards merge OUT`).

The merge numbers the partitions' tars globally in group order ({prefix}-000000.tar, ...; a hard
link each, no copy), writes rejects.jsonl (interleaved back into unit order), sizes.json and, last,
manifest.json. Same inputs, tokenizers and flags give byte-identical shards and manifest (fixed tar
headers, stable document keys, no timestamps), whatever --num-partitions and --workers: every tar
holds the same documents of the same group under the same name, so the output directory is byte for
byte the same for 1, 2, 3 or 7 partitions (tests/test_shards_partitions.py; the manifest does not
record the partition count). More than --max-reject-fraction (default 0.5) of the inputs rejected: the
report is written, then a BuildError (exit 2) and no manifest; the partitions stay staged.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import multiprocessing as mp
import os
import shutil
import socket
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moma.pipeline.documents import Document, Reject, document_key, safe_text
from moma.pipeline.errors import MomaError
from moma.pipeline.readers.base import make_reader
from moma.pipeline.shards.assemble import DocumentTokenizer, Tokenizers
from moma.pipeline.shards.build_config import DEFAULT_MAX_REJECT_FRACTION, STAGING, BuildConfig
from moma.pipeline.shards.groups import Planned, partition_plan, plan_groups
from moma.pipeline.shards.manifest import MANIFEST, REJECTS, Manifest
from moma.pipeline.shards.writer import ShardInfo, ShardWriter
from moma.tokenizers.fileio import atomic_write, write_json_atomic
from moma.tokenizers.progress import progress as progress_bar
from moma.tokenizers.vocab import Vocab

DONE = "done.json"
KEYS = "keys.txt"  # a partition's document keys, sorted: the merge checks that no key is written twice


class BuildError(MomaError):
    """The build ran but must not be used (too many rejects, conflicting settings ...)."""


# (global unit index, record position in the unit): where a record comes from, whatever the
# partitioning. Rejects are ordered by it, so rejects.jsonl does not depend on --num-partitions.
Tag = tuple[int, int]


@dataclasses.dataclass
class PartitionResult:
    index: int
    shards: list[ShardInfo]
    inputs: int
    rejects: dict[str, int]
    seconds: float
    by_source: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # source index -> counts
    groups: list[int] | None = None  # shards[i]'s unit group (the merge's order); None: staged by an older moma

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "shards": [s.to_json() for s in self.shards], "inputs": self.inputs,
                "rejects": self.rejects, "seconds": self.seconds, "by_source": self.by_source, "groups": self.groups}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PartitionResult:
        return cls(index=d["index"], shards=[ShardInfo.from_json(s) for s in d["shards"]], inputs=d["inputs"],
                   rejects=d["rejects"], seconds=d["seconds"], by_source=d.get("by_source", {}),
                   groups=d.get("groups"))


def _plan(cfg: BuildConfig) -> list[Planned]:
    """Every unit of every source in listing order, with its global index and group (shards/groups.py)."""
    readers = [make_reader(spec, cfg.options, idx) for idx, spec in enumerate(cfg.sources)]
    units = [(idx, u) for idx, reader in enumerate(readers) for u in reader.units()]
    return plan_groups(units, readers, cfg.max_docs_per_shard, cfg.max_bytes_per_shard)


# What a reader's unit can raise when the unit itself cannot be read (a corrupt parquet page, a
# truncated footer, a zlib stream cut short ...): the unit is rejected with the reason, the build goes
# on. A bad *record* never gets here: readers reject it themselves and go on with the next.
UNIT_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, zlib.error, RuntimeError,
               RecursionError)


def _records(cfg: BuildConfig, units: list[Planned]) -> Iterator[tuple[Planned, Document | Reject, Tag]]:
    """(unit, record, tag) for every record of `units`. A unit whose reader fails is rejected naming
    the unit, once for every record it held and did not give (Reader.unit_records; one when unknown):
    inputs = written + rejected, always. The records it gave before the failure stand."""
    readers = [make_reader(spec, cfg.options, idx) for idx, spec in enumerate(cfg.sources)]
    for planned in units:
        g, idx, unit = planned.index, planned.source, planned.unit
        reader = readers[idx]
        pos = 0
        try:
            for record in reader.read(unit):
                if isinstance(record, Document):
                    record.key = document_key(idx, record.record_id)
                yield planned, record, (g, pos)
                pos += 1
        except UNIT_ERRORS as e:
            try:
                held = reader.unit_records(unit)
            except Exception:  # the count is a hint; the unit is already known to be broken
                held = None
            lost = max(held - pos, 1) if held is not None else 1
            detail = f"{type(e).__name__}: {e}" + (f" ({lost} records of this unit not read)" if lost > 1 else "")
            for _ in range(lost):
                yield planned, Reject(reader.name, reader.unit_id(unit), "unreadable_unit", safe_text(detail)), (g, pos)
                pos += 1


def _output_settings(cfg: BuildConfig, tokenizers: Tokenizers) -> dict[str, Any]:
    """What decides the output's bytes (a finished build with the same is this build)."""
    return json.loads(json.dumps({**cfg.settings(), "vocab": tokenizers.vocab.to_json()}))


def _staged_settings(cfg: BuildConfig, tokenizers: Tokenizers) -> dict[str, Any]:
    """The output settings plus the partition count: staged partitions of another count cannot be mixed in."""
    return {**_output_settings(cfg, tokenizers), "num_partitions": cfg.num_partitions}


def _differences(old: Any, new: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if old == new else [(where, old, new)]


def _describe(diffs: list[tuple[str, Any, Any]], old_word: str) -> str:
    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    diffs = sorted(diffs, key=lambda d: "sha256" not in d[0])  # a tokenizer's identity says the most
    return "; ".join(f"{k}: {old_word} {short(a)}, now {short(b)}" for k, a, b in diffs[:6]) + \
        (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")


def _prepare_staging(cfg: BuildConfig, tokenizers: Tokenizers) -> None:
    """Record the build's settings once; a build with other settings or tokenizers in the same
    --out is an error naming what differs (never mixed in, never returned as if it were this one)."""
    settings = _staged_settings(cfg, tokenizers)
    path = cfg.staging / "build.json"
    if path.exists():
        diffs = _differences(json.loads(path.read_text()), settings)
        if diffs:
            raise BuildError(f"{cfg.out} holds an unfinished build with other settings ({path}): "
                             f"{_describe(diffs, 'staged')}. Finish it with its own flags, or start over with "
                             f"--overwrite")
        return
    write_json_atomic(path, settings)


def _check_existing(cfg: BuildConfig, tokenizers: Tokenizers, overwrite: bool) -> Manifest | None:
    """The finished build in --out if it is this build; an error naming the differences if it is
    another (or, with `overwrite`, the other build removed: its shards, manifest and staging)."""
    out = Path(cfg.out)
    settings = _staged_settings(cfg, tokenizers)
    if (out / MANIFEST).exists():
        existing = Manifest.load(out)
        built = json.loads(json.dumps({**existing.build.get("settings", {}), "vocab": existing.vocab.to_json()}))
        diffs = _differences(built, _output_settings(cfg, tokenizers))
        if not diffs:
            return existing
        if not overwrite:
            raise BuildError(f"{out} already holds a finished build with other settings: {_describe(diffs, 'built')}; "
                             f"use another --out, or --overwrite to replace it")
        for name in [s.name for s in existing.shards] + [MANIFEST, REJECTS, "sizes.json"]:
            (out / name).unlink(missing_ok=True)
    staged = cfg.staging / "build.json"
    if staged.exists():
        diffs = _differences(json.loads(staged.read_text()), settings)
        if diffs and not overwrite:
            raise BuildError(f"{out} holds an unfinished build with other settings ({staged}): "
                             f"{_describe(diffs, 'staged')}. Finish it with its own flags, or start over with "
                             f"--overwrite")
        if diffs:
            held = sorted(cfg.staging.glob("part-*.lock"))
            if held:
                raise BuildError(f"--overwrite: {held[0]} is held ({held[0].read_text().strip()}); stop that build "
                                 f"first")
            shutil.rmtree(cfg.staging)
    return None


@functools.lru_cache(maxsize=2)
def _load_tokenizers(text: str, image: str | None, pattern: str | None) -> Tokenizers:
    """Once per worker process, not once per partition: a VQ checkpoint and a BPE rank table take
    a good part of a second to load, which small partitions would pay again and again."""
    return Tokenizers.load(text, image, pattern)


class PartitionLock:
    """One owner per partition: `part-i.lock`, holding host, pid and start time. The record is
    written to a temporary file first and hard-linked into place (link fails if the lock exists),
    so a lock never exists without its holder record, whenever the process dies (SIGKILL, a full
    disk). A lock left by a process that died on this host (SIGKILL, a requeue) is taken over; one
    held by a live process, or by another host (which cannot be checked from here), is an error
    naming it."""

    def __init__(self, staging: Path, index: int, out: str) -> None:
        self.path = staging / f"part-{index:05d}.lock"
        self.index, self.out = index, out
        self.mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            # No holder record: an older moma created its lock empty and wrote it after, and died in
            # between. Locks appear complete now, so one that stays empty for a minute is such a leftover.
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def __enter__(self) -> PartitionLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(self.mine)
                f.flush()
                os.fsync(f.fileno())
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic and exclusive: the lock appears with its record, or not at all
                    return self
                except FileExistsError:
                    holder = self._holder()
                    if self._stale(holder):
                        self.path.unlink(missing_ok=True)  # its owner is gone: take it over (once)
                        continue
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise BuildError(f"partition {self.index} of {self.out} is held by pid {holder.get('pid', '?')} "
                                     f"on {holder.get('host', '?')} since {since} ({self.path}); if that process is "
                                     f"gone, remove the lock file") from None
            raise BuildError(f"partition {self.index} of {self.out}: could not take {self.path}")
        except OSError as e:  # a full disk (ENOSPC), a quota, a read-only mount: name the file
            raise BuildError(f"cannot take the lock {self.path} (writing {tmp.name}): "
                             f"{e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def __exit__(self, *exc: Any) -> None:
        if self.path.exists() and self.path.read_text() == self.mine:
            self.path.unlink()


def run_partition(cfg: BuildConfig, index: int, threads: int | None = None, progress: bool = False,
                  units: list[Planned] | None = None) -> PartitionResult:
    """Build partition `index` (or return its recorded result if it is already done, with the same
    settings). `units`: this partition's groups of units (groups.partition_plan) when the caller
    planned them."""
    tokenizers = _load_tokenizers(cfg.text_tokenizer, cfg.image_tokenizer, cfg.text_pattern)
    _prepare_staging(cfg, tokenizers)
    part = cfg.staging / f"part-{index:05d}"
    if (part / DONE).exists():
        return PartitionResult.from_json(json.loads((part / DONE).read_text()))
    with PartitionLock(cfg.staging, index, cfg.out):
        return _build_partition(cfg, index, part, tokenizers, threads, progress, units)


def _build_partition(cfg: BuildConfig, index: int, part: Path, tokenizers: Tokenizers, threads: int | None,
                     progress: bool, units: list[Planned] | None) -> PartitionResult:
    if (part / DONE).exists():  # finished by another process while this one waited for nothing
        return PartitionResult.from_json(json.loads((part / DONE).read_text()))
    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    shutil.rmtree(part, ignore_errors=True)  # an interrupted attempt is redone from scratch
    part.mkdir(parents=True)
    encode = DocumentTokenizer(tokenizers, text_threads=threads or 1, max_pixels=cfg.max_pixels,
                               jpeg_draft=cfg.jpeg_draft)
    writer = ShardWriter(part, "shard-{:06d}.tar", cfg.max_docs_per_shard, cfg.max_bytes_per_shard)
    rejects: list[tuple[Tag, Reject]] = []
    inputs = 0
    seen: set[str] = set()
    batch: list[tuple[Planned, Document, Tag]] = []
    counts: dict[int, Counter] = {i: Counter() for i in range(len(cfg.sources))}
    bar = progress_bar(desc=f"partition {index}", unit="doc", disable=not progress)

    def reject(source: int, r: Reject, tag: Tag) -> None:
        rejects.append((tag, r))
        counts[source]["rejected"] += 1

    def flush() -> None:
        for (planned, _, tag), item in zip(batch, encode([doc for _, doc, _ in batch])):
            if isinstance(item, Reject):
                reject(planned.source, item, tag)
                continue
            doc = item.doc
            meta = {"source": doc.source, "id": doc.record_id, "text_tokens": item.text_tokens,
                    "image_tokens": item.image_tokens, "images": doc.num_images}
            # a new tar at each group: its bytes depend on the group's documents only
            writer.write(doc.key, item.tokens, meta, item.text_tokens, item.image_tokens, group=planned.group)
            counts[planned.source]["docs"] += 1
        bar.update(len(batch))
        batch.clear()

    if units is None:
        units = partition_plan(_plan(cfg), index, cfg.num_partitions)
    for planned, record, tag in _records(cfg, units):
        source = planned.source
        inputs += 1
        counts[source]["inputs"] += 1
        if isinstance(record, Reject):
            reject(source, record, tag)
            continue
        # Ids are unique within a source by construction (paths as the user sees them, positions,
        # COCO repeats decided by the reader from the whole file); what remains is a repeat inside
        # one unit (an img2dataset tar listing a key twice), which every partitioning sees the same.
        if record.key in seen:
            reject(source, Reject(record.source, record.record_id, "duplicate_id", f"key {record.key}"), tag)
            continue
        seen.add(record.key)
        batch.append((planned, record, tag))
        if len(batch) >= cfg.doc_batch:
            flush()
    flush()
    bar.close()
    shards = writer.close()
    rejects.sort(key=lambda tr: tr[0])
    with atomic_write(part / REJECTS, "wb") as f:
        for (g, pos), r in rejects:  # tagged: the merge interleaves partitions back into unit order
            entry = {**r.to_json(), "unit": g, "pos": pos}
            f.write((json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    with atomic_write(part / KEYS, "wb") as f:
        f.writelines(f"{key}\n".encode() for key in sorted(seen))
    result = PartitionResult(index=index, shards=shards, inputs=inputs,
                             rejects=dict(sorted(Counter(r.reason for _, r in rejects).items())),
                             seconds=time.perf_counter() - start,
                             by_source={str(i): {k: c[k] for k in ("inputs", "docs", "rejected")}
                                        for i, c in counts.items()},
                             groups=list(writer.groups))
    write_json_atomic(part / DONE, result.to_json())  # last: marks the partition complete
    return result


def _partition_task(args: tuple[BuildConfig, int, int, list[Planned]]) -> PartitionResult:
    cfg, index, threads, units = args
    return run_partition(cfg, index, threads, units=units)


def build(cfg: BuildConfig, workers: int = 1, partition: int | None = None, progress: bool = True,
          overwrite: bool = False) -> Manifest | PartitionResult:
    """Run one partition (SLURM array task) or all pending ones on `workers` processes, then merge.
    A finished or staged build in --out with other settings or tokenizers is refused, naming the
    differences (`overwrite`: removed, and this build starts over)."""
    if partition is not None and not 0 <= partition < cfg.num_partitions:
        raise ValueError(f"--partition {partition} outside [0, {cfg.num_partitions})")
    tokenizers = _load_tokenizers(cfg.text_tokenizer, cfg.image_tokenizer, cfg.text_pattern)
    existing = _check_existing(cfg, tokenizers, overwrite)
    if partition is not None:
        if existing is not None:
            raise BuildError(f"{cfg.out} is already built and merged; partition {partition} has nothing to do")
        return run_partition(cfg, partition, threads=None, progress=progress)
    if existing is not None:
        print(f"{cfg.out}: already built ({len(existing.shards)} shards); nothing to do")
        return existing
    plan = _plan(cfg)  # listed once; also surfaces source errors (missing files, bad columns) before any work
    n = cfg.num_partitions
    pending = [i for i in range(n) if not (cfg.staging / f"part-{i:05d}" / DONE).exists()]
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    start = time.perf_counter()
    bar = progress_bar(total=n, initial=n - len(pending), desc="partitions", disable=not progress)
    if workers <= 1:
        for i in pending:
            run_partition(cfg, i, threads=threads, units=partition_plan(plan, i, n))
            bar.update(1)
    else:
        # spawn: the parent may hold torch/tiktoken thread pools that fork would copy half-alive
        with mp.get_context("spawn").Pool(workers) as pool:
            tasks = [(cfg, i, threads, partition_plan(plan, i, n)) for i in pending]
            for _ in pool.imap_unordered(_partition_task, tasks):
                bar.update(1)
            pool.close()  # a clean shutdown; the with-block's terminate() leaks the pool's semaphores
            pool.join()
    bar.close()
    manifest = merge(cfg.out, max_reject_fraction=cfg.max_reject_fraction)
    t = manifest.totals
    elapsed = time.perf_counter() - start
    print(f"built {t['docs']} docs in {len(manifest.shards)} shards: {t['tokens']['text']} text + "
          f"{t['tokens']['image']} image tokens; {reject_summary(t['rejected'], t['inputs'], t['rejects_by_reason'])}; "
          f"{t['docs'] / max(elapsed, 1e-9):.1f} docs/s -> {cfg.out}")
    return manifest


def reject_summary(rejected: int, inputs: int, reasons: dict[str, int], top: int = 3) -> str:
    """"rejected 30 of 32 inputs (93.8%: missing_image 28, bad_json 2)": the share and the top reasons."""
    if not rejected:
        return f"rejected 0 of {inputs} inputs"
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    named = ", ".join(f"{k} {v}" for k, v in ranked[:top]) + (f", +{len(ranked) - top} more reasons"
                                                              if len(ranked) > top else "")
    return f"rejected {rejected} of {inputs} inputs ({rejected / max(inputs, 1):.1%}: {named})"


def _tagged_rejects(path: Path) -> Iterator[tuple[Tag, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            yield (entry.pop("unit", 0), entry.pop("pos", 0)), entry


def _write_rejects(out: Path, staging: Path, results: list[PartitionResult]) -> None:
    """rejects.jsonl: every partition's rejects interleaved back into unit order (a streaming merge
    of sorted files), so its bytes do not depend on the partitioning."""
    streams = [_tagged_rejects(staging / f"part-{r.index:05d}" / REJECTS) for r in results]
    with atomic_write(out / REJECTS, "wb") as f:
        for _, entry in heapq.merge(*streams, key=lambda e: e[0]):
            f.write((json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def _check_unique_keys(staging: Path, results: list[PartitionResult]) -> None:
    """No key written by two partitions (a streaming merge of their sorted key lists)."""
    def keys(index: int) -> Iterator[tuple[str, int]]:
        path = staging / f"part-{index:05d}" / KEYS
        if not path.exists():  # staged by an older moma
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n"), index

    previous: tuple[str, int] | None = None
    for key, index in heapq.merge(*(keys(r.index) for r in results)):
        if previous is not None and previous[0] == key:
            raise BuildError(f"key {key} is written by partitions {previous[1]} and {index}: two records of one "
                             f"source share an id (a reader bug; please report it)")
        previous = (key, index)


def _ordered_shards(results: list[PartitionResult]) -> list[tuple[PartitionResult, ShardInfo]]:
    """Every staged tar in global order: by unit group (a group is one partition's, its tars in the
    order written), so the numbering does not depend on the partitioning. A partition staged by an
    older moma (no groups recorded) sorts as if its tars were one group, after the grouped ones."""
    ordered = []
    for r in results:
        groups = r.groups if r.groups is not None and len(r.groups) == len(r.shards) else None
        for k, s in enumerate(r.shards):
            ordered.append(((0, groups[k], 0, k) if groups is not None else (1, 0, r.index, k), r, s))
    ordered.sort(key=lambda t: t[0])
    return [(r, s) for _, r, s in ordered]


def merge(out: str | Path, max_reject_fraction: float | None = DEFAULT_MAX_REJECT_FRACTION) -> Manifest:
    """Number the partitions' tars globally and write rejects.jsonl, sizes.json, manifest.json.
    More than `max_reject_fraction` of the inputs rejected (None: any share is accepted): the report
    (rejects.jsonl) is written, then a BuildError; no manifest, and the staged partitions are kept,
    so a merge with a higher threshold needs no rebuild."""
    out = Path(out)
    staging = out / STAGING
    try:
        settings = json.loads((staging / "build.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{staging}/build.json missing: no partition of this build has started") from None
    n = settings.pop("num_partitions")  # not in the manifest: the output does not depend on it
    missing = [i for i in range(n) if not (staging / f"part-{i:05d}" / DONE).exists()]
    if missing:
        raise BuildError(f"cannot merge {out}: partitions {missing[:10]}{'...' if len(missing) > 10 else ''} "
                         f"are not done (rerun them; finished ones are skipped)")
    results = [PartitionResult.from_json(json.loads((staging / f"part-{i:05d}" / DONE).read_text()))
               for i in range(n)]
    inputs = sum(r.inputs for r in results)
    reasons: Counter[str] = Counter()
    for r in results:
        reasons.update(r.rejects)
    rejected = sum(reasons.values())
    _check_unique_keys(staging, results)
    _write_rejects(out, staging, results)
    if max_reject_fraction is not None and inputs and rejected / inputs > max_reject_fraction:
        summary = reject_summary(rejected, inputs, dict(reasons)).removeprefix("rejected ")
        raise BuildError(f"{summary.replace(' inputs (', ' inputs rejected (', 1)} > --max-reject-fraction "
                         f"{max_reject_fraction:g}: no manifest written; every reject is in {out / REJECTS}. "
                         f"To accept this build, rerun with --max-reject-fraction 1 (finished partitions are kept)")
    shards: list[ShardInfo] = []
    for r, s in _ordered_shards(results):
        final = ShardInfo(**{**dataclasses.asdict(s), "name": f"{settings['prefix']}-{len(shards):06d}.tar"})
        tmp = out / f".{final.name}.tmp"
        tmp.unlink(missing_ok=True)
        os.link(staging / f"part-{r.index:05d}" / s.name, tmp)  # hard link: no copy, atomic rename
        os.replace(tmp, out / final.name)
        shards.append(final)
    written = sum(s.docs for s in shards)
    assert written + rejected == inputs, "partition accounting does not add up"
    by_source = [Counter() for _ in settings["sources"]]
    for r in results:
        for i, c in r.by_source.items():
            by_source[int(i)].update(c)
    totals = {"docs": written, "inputs": inputs, "rejected": rejected,
              "rejects_by_reason": dict(sorted(reasons.items())),
              "by_source": {spec: {k: c[k] for k in ("inputs", "docs", "rejected")}
                            for spec, c in zip(settings["sources"], by_source)},
              "tokens": {"text": sum(s.text_tokens for s in shards), "image": sum(s.image_tokens for s in shards)}}
    vocab = Vocab.from_json(settings.pop("vocab"), source=str(staging / "build.json"))
    manifest = Manifest(vocab=vocab, shards=shards, build={"settings": settings}, totals=totals)
    manifest.save(out)
    shutil.rmtree(staging)
    return manifest
