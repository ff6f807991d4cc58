"""The training data loader: packed multimodal batches from shard directories, split over ranks and
DataLoader workers, with exact mid-epoch resume (also onto another world size).

    loader = PackedLoader(DataConfig(sources=(DataSource("shards/", 1.0),), seq_len=512), batch_size=8,
                          rank=0, world_size=1, vocab=run_vocab)
    for batch in loader: ...                  # input_ids [B, L], labels [B, L] (-100 = ignored)
    state = loader.state_dict()               # after K batches
    PackedLoader(cfg, ..., state=state)       # yields exactly what the uninterrupted loader yields next

Every rank runs S_r = max(1, num_workers) streams (stream.py) — globally S = world_size * S_r —
each owning a deterministic share of every epoch (epoch_plan.py). Batches are assembled inside the
workers and carry their stream's state; this process keeps, per stream, the state that came with
the last batch it *consumed* (prefetched batches do not count) and the number consumed. Workers send
batches in chunks (a few per item: the per-item cost of a worker -> main transfer is fixed) and a
torch DataLoader serves workers round-robin, so on resume the workers are rotated, and the first
chunk shortened, to make the next batch come from the right stream.

With `data.verify_shards` each stream hashes a shard when it first opens it (shard_reader.open_shard)
and stops the run on a sha256 that differs from manifest.json's.

Why not torchdata's StatefulDataLoader: its snapshots are opaque per-worker blobs, while re-splitting
onto another world size needs every stream's cursor; batches that carry their own small state give
exactly that, with a plain DataLoader.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand

from moma.pipeline.errors import MomaError
from moma.pipeline.loader.epoch_plan import Shape, SourceShards, upgrade_v2
from moma.pipeline.loader.stream import (
    Stream,
    StreamConfig,
    StreamInput,
    fresh_state,
    resplit_states,
    to_batch,
)
from moma.pipeline.shards.manifest import Manifest
from moma.tokenizers.vocab import Vocab

log = logging.getLogger("moma.loader")
STATE_VERSION = 3  # 3: re-split pieces count the documents `left`; 2 (until an epoch) is upgraded on load


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str  # a shard directory, or DIR/prefix-{000000..000123}.tar for a subset of its shards
    weight: float = 1.0  # share of the *tokens* drawn from this source (normalised over sources)

    @classmethod
    def parse(cls, spec: str) -> DataSource:
        """"DIR" or "DIR@WEIGHT"."""
        path, sep, weight = spec.rpartition("@")
        if not sep:
            return cls(spec)
        try:
            return cls(path, float(weight))
        except ValueError:
            raise ValueError(f"data source {spec!r}: weight {weight!r} is not a number") from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section of a run config, and everything a loader reads it with (the batch size
    and the seed come from the run: `parallel.micro_batch`, `seed`)."""

    sources: tuple[DataSource, ...] = ()
    seq_len: int = 256
    shuffle_buffer: int = 1000  # documents read and shuffled together (memory bound per source)
    num_workers: int = 2  # DataLoader workers per rank; each runs one stream (0: one stream in-process)
    open_shards: int = 4  # shards one stream reads side by side (its share split into this many lanes)
    keep_images_whole: bool = False  # move an image that a window would cut into the next window
    strict: bool = False  # bad shard data stops the run instead of being counted and skipped
    verify_shards: bool = False  # hash each shard as a stream first opens it; a sha256 mismatch stops the run
    prefetch_factor: int = 4
    transport_chunk: int | None = None  # raw batches per worker->main item; None: ~64k tokens, at most 16
    eval_sources: tuple[DataSource, ...] = ()  # held-out shards (training/evaluate.py; `eval.every`)

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    source: DataSource
    directory: Path
    manifest: Manifest
    shard_paths: tuple[str, ...]
    docs: tuple[int, ...]

    def sha256s(self) -> tuple[str, ...]:
        """Each shard's sha256 as manifest.json records it (data.verify_shards); one it lacks is an error."""
        by_name = {s.name: s.sha256 for s in self.manifest.shards}
        out = tuple(by_name[Path(p).name] for p in self.shard_paths)
        lacking = [Path(p).name for p, h in zip(self.shard_paths, out) if len(h) != 64]
        if lacking:
            raise ValueError(f"data.verify_shards: {self.directory / 'manifest.json'} records no sha256 for "
                             f"{lacking[0]} ({len(lacking)} shard(s)); rebuild the shards or set verify_shards false")
        return out


def resolve_source(src: DataSource) -> ResolvedSource:
    """A source's manifest and the shards it names (brace patterns expanded by `braceexpand`,
    the library webdataset uses)."""
    path = Path(src.path)
    directory = path if path.is_dir() else path.parent
    manifest = Manifest.load(directory)
    by_name = {s.name: s for s in manifest.shards}
    if path.is_dir():
        names = [s.name for s in manifest.shards]
    else:
        names = [Path(n).name for n in braceexpand(src.path)]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{src.path}: {unknown[:3]} not listed in {directory / 'manifest.json'}")
    names = [n for n in names if by_name[n].docs > 0]
    if not names:
        raise ValueError(f"{src.path}: no documents")
    return ResolvedSource(src, directory, manifest, tuple(str(directory / n) for n in names),
                          tuple(by_name[n].docs for n in names))


def resolve_sources(data: DataConfig, streams: int, vocab: Vocab | None = None,
                    consumer: str = "the run's tokenizers", check_files: bool = True) -> list[ResolvedSource]:
    """Every source resolved and checked: the same tokenizers everywhere (against `vocab`, else
    against the first source), a positive weight, at least one document per stream, and shards
    missing on disk (an error when strict, else a warning: they are counted and skipped). The
    checks `moma train --check` runs before launch and the loader runs again on every rank (without
    `check_files`: statting 10^5 shards on every rank would cost more than all the rest; a missing
    shard is found, and counted, when a stream opens it)."""
    if not data.sources:
        raise ValueError("no data sources: give at least one shard directory")
    resolved: list[ResolvedSource] = []
    for src in data.sources:
        try:
            r = resolve_source(src)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"data.sources {src.path}: {e}") from None
        if vocab is not None:
            r.manifest.check_tokenizers(vocab, r.directory, consumer)
        elif resolved:
            first = resolved[0]
            r.manifest.check_tokenizers(first.manifest.vocab, r.directory, str(first.directory / "manifest.json"))
        if src.weight <= 0:
            raise ValueError(f"data.sources {src.path}: weight must be > 0, got {src.weight}")
        if data.verify_shards:
            r.sha256s()  # every shard has one to check against (refused here, before launch, if not)
        if sum(r.docs) < streams:
            raise ValueError(f"data.sources {src.path} has {sum(r.docs)} documents but the loader runs {streams} "
                             f"streams (ranks x max(1, data.num_workers)) and every stream needs one: use fewer "
                             f"workers or more data")
        missing = [p for p in r.shard_paths if not Path(p).exists()] if check_files else []
        if missing:
            if data.strict:
                raise MomaError(f"data.sources {src.path}: {len(missing)} shard(s) listed in "
                                f"{r.directory / 'manifest.json'} are missing on disk, e.g. {missing[0]}")
            log.warning("%d shard(s) of %s missing on disk (they will be counted and skipped): %s",
                        len(missing), r.directory, missing[:3])
        resolved.append(r)
    return resolved


class _StreamsDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its stream (after the resume rotation), in chunks of
    `chunk` raw batches (worker 0's first chunk: `first_chunk`, the rest of an interrupted one).

    Why chunks: every item a worker sends costs a fixed ~0.15 ms of pickling, pipe and wake-up,
    as much as packing a whole batch of short windows. The DataLoader takes items from its workers
    round-robin, so batches come out as chunk 0 of worker 0, chunk 0 of worker 1, ..."""

    def __init__(self, sources: list[StreamInput], cfg: StreamConfig, rank: int, per_rank: int, streams: int,
                 rotation: int, states: dict[int, Any], chunk: int, first_chunk: int) -> None:
        self.sources, self.cfg = sources, cfg
        self.rank, self.per_rank, self.streams, self.rotation = rank, per_rank, streams, rotation
        self.states = states
        self.chunk, self.first_chunk = chunk, first_chunk

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        stream = self.rank * self.per_rank + (worker + self.rotation) % self.per_rank
        batches = iter(Stream(self.sources, self.cfg, stream, self.streams, self.states.get(stream)))
        size = self.first_chunk if worker == 0 else self.chunk
        while True:
            yield [next(batches) for _ in range(size)]  # states are small: no leftover tokens travel
            size = self.chunk


class PackedLoader:
    def __init__(self, data: DataConfig, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 vocab: Vocab | None = None, consumer: str = "the run's tokenizers",
                 state: dict[str, Any] | list[dict[str, Any]] | None = None):
        self.cfg, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = data.streams_per_rank
        self.streams = world_size * self.per_rank
        # shards are statted only in strict mode (at 10^5 shards that is the slowest part of start-up)
        self.resolved = resolve_sources(data, self.streams, vocab, consumer, check_files=data.strict)
        self.vocab = vocab or self.resolved[0].manifest.vocab
        self.stream_cfg = StreamConfig(data=data, batch_size=batch_size, seed=seed, vocab_size=self.vocab.size,
                                       pad_id=self.vocab.pad_id, boi_id=self.vocab.boi_id, eoi_id=self.vocab.eoi_id)
        self.plans = [SourceShards(r.docs, tuple(Path(p).name for p in r.shard_paths)) for r in self.resolved]
        self.stream_sources = [StreamInput(r.shard_paths, plan, draw, r.sha256s() if data.verify_shards else ())
                               for r, plan, draw in zip(self.resolved, self.plans, self._draw_weights())]
        self.consumed = 0
        self.stream_states: dict[int, Any] = {}
        if state is not None:
            self._restore(state)

    def _draw_weights(self) -> list[float]:
        """Weights are shares of tokens; documents are drawn one at a time, so a source's draw
        probability is its weight over its mean document length (a 40k-token book and a 90-token
        caption pair must not count alike)."""
        out = []
        for r in self.resolved:
            used = {Path(p).name for p in r.shard_paths}
            tokens = sum(s.text_tokens + s.image_tokens for s in r.manifest.shards if s.name in used)
            out.append(r.source.weight / max(tokens / max(sum(r.docs), 1), 1.0))
        return out

    # --- iteration ------------------------------------------------------------------------------
    @property
    def chunk(self) -> int:
        """Raw batches per worker item: about 64k tokens (1 for long windows), at most 16 (the
        first batch waits for a whole chunk)."""
        if self.cfg.transport_chunk is not None:
            return self.cfg.transport_chunk
        return min(16, max(1, 65536 // (self.batch_size * (self.cfg.seq_len + 1))))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Batch i came from chunk i // chunk, served by stream (chunk index + rotation) % per_rank.
        done_chunks, into_chunk = divmod(self.consumed, self.chunk)
        dataset = _StreamsDataset(self.stream_sources, self.stream_cfg, self.rank, self.per_rank, self.streams,
                                  done_chunks % self.per_rank, dict(self.stream_states), self.chunk,
                                  self.chunk - into_chunk)
        if self.cfg.num_workers > 0:
            # collate_fn=_as_is: keep the workers' numpy arrays (default_convert would make tensors there)
            # generator: the DataLoader draws its workers' base seed from this, not from torch's global RNG,
            # so creating an iterator after a resume's set_rng_state leaves the training RNG untouched
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                                 prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                                                 collate_fn=_as_is, generator=self._dataloader_generator())
        else:
            loader = dataset  # type: ignore[assignment]
        for chunk in loader:
            for raw in chunk:
                self.stream_states[raw["stream"]] = raw.pop("state")
                self.consumed += 1
                yield to_batch(raw, self.stream_cfg.pad_id)

    def _dataloader_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)

    def bad_counts(self) -> dict[str, int]:
        """Skipped bad data so far, by reason, over this rank's streams."""
        total: Counter = Counter()
        for st in self.stream_states.values():
            total.update(st.get("bad", {}))
        return dict(total)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain containers only (loadable with torch.load(weights_only=True)); a few hundred bytes
        per stream whatever the number of shards or the length of documents."""
        return {"version": STATE_VERSION, "world_size": self.world_size, "per_rank": self.per_rank,
                "rank": self.rank, "consumed": self.consumed, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle_buffer": self.cfg.shuffle_buffer, "open_shards": self.cfg.open_shards,
                "sources": [[str(r.directory), plan.digest, plan.total] for r, plan in zip(self.resolved, self.plans)],
                "streams": {int(k): v for k, v in self.stream_states.items()}}

    def _restore(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """One rank's saved state (same layout), or all ranks' states (any layout: re-split)."""
        states = [self._upgrade(st) for st in (state if isinstance(state, list) else [state])]
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {st.get('version')} != {STATE_VERSION}: it was written by "
                                 f"another version of the loader")
            if (st["seed"], st["shuffle_buffer"], st["open_shards"]) != \
                    (self.seed, self.cfg.shuffle_buffer, self.cfg.open_shards) or \
                    [d for _, d, _ in st["sources"]] != [p.digest for p in self.plans]:
                raise ValueError("the saved loader state belongs to other data, seed, shuffle buffer or open shards; "
                                 "resuming it would not continue the same stream")
        old_world, old_per_rank = states[0]["world_size"], states[0]["per_rank"]
        same = (old_world, old_per_rank, states[0]["batch_size"]) == (self.world_size, self.per_rank, self.batch_size)
        mine = next((st for st in states if st["rank"] == self.rank), None)
        if same and mine is not None:
            self.consumed = mine["consumed"]
            self.stream_states = {int(k): v for k, v in mine["streams"].items()}
            return
        if len(states) != old_world:
            raise ValueError(f"re-splitting the loader ({old_world} ranks x {old_per_rank} streams -> "
                             f"{self.world_size} x {self.per_rank}) needs the loader states of all {old_world} old "
                             f"ranks, got {len(states)}")
        old_streams = old_world * old_per_rank
        by_stream: dict[int, Any] = {}
        for st in states:
            by_stream.update({int(k): v for k, v in st["streams"].items()})
        old = [by_stream.get(s) or fresh_state(len(self.plans), s, old_streams, states[0]["batch_size"])
               for s in range(old_streams)]
        new = resplit_states(old, self.streams, self.batch_size, self.shapes)
        if self.rank == 0:  # skipped-data counters live on
            new[0]["bad"] = dict(sum((Counter(o.get("bad", {})) for o in old), Counter()))
        self.consumed = 0
        self.stream_states = {s: new[s] for s in range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)}
        log.info("loader re-split: %d streams (%d ranks x %d) -> %d streams", old_streams, old_world, old_per_rank,
                 self.streams)


    @property
    def shapes(self) -> list[Shape]:
        return [Shape(plan.total, self.cfg.open_shards, self.cfg.shuffle_buffer) for plan in self.plans]

    def _upgrade(self, st: dict[str, Any]) -> dict[str, Any]:
        """A state of loader version 2 read as this version's (its cursors alone changed)."""
        if st.get("version") != 2 or [d for _, d, _ in st.get("sources", [])] != [p.digest for p in self.plans] or \
                st.get("open_shards") != self.cfg.open_shards or st.get("shuffle_buffer") != self.cfg.shuffle_buffer:
            return st  # any other mismatch is refused, naming it, by _restore
        streams = {k: {**v, "cursors": [upgrade_v2(cs, shape) for cs, shape in zip(v["cursors"], self.shapes)]}
                   for k, v in st["streams"].items()}
        return {**st, "version": STATE_VERSION, "streams": streams}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch
