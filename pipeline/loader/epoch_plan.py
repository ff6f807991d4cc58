"""Who reads what: each stream's share of every epoch, the order it reads it in, and how a re-split
hands unfinished shares to another layout — all arithmetic on a few integers, no lists of shards
or documents in any state.

A *stream* is one reader of the data: rank r's DataLoader worker w is stream r * W + w of
S = world_size * max(1, num_workers). For source m in epoch e the shards are put in an order drawn
from (seed, m, e) and their documents, concatenated, form one index space [0, N) (EpochLayout).
Stream s of S owns the contiguous range [s * N / S, (s + 1) * N / S): shares differ by at most one
document whatever the number of shards, and they cover the epoch exactly once.

Inside its share a stream reads `lanes` sub-ranges side by side (several shards open at once, as
webdataset/OpenCLIP shuffle), `block_size` documents at a time: block b holds the next
ceil(block_size / lanes) documents of every lane, emitted in an order drawn from a seed naming the
block (Cursor.block_positions). A Cursor — (S, s, epoch, block, offset, until) — is where one such
reader stands; it is the whole state of a stream's reading position.

Re-splitting (resume on another world size or worker count): every old stream's cursors are kept
as they are (an unfinished share is continued exactly as the old stream would have continued it,
to the end of the most advanced old epoch `top`) and dealt round-robin to the new streams, which
read them first and then start epoch top + 1 under the new layout: no document repeated, none
skipped, after any number of re-splits in a row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator

import numpy as np

OPEN = -1  # Cursor.until of a stream's own cursor: it reads epoch after epoch


@dataclasses.dataclass(frozen=True)
class SourceShards:
    """One source's shards: their document counts in manifest order (and a digest of them)."""

    docs_per_shard: tuple[int, ...]
    names: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.docs_per_shard)

    @functools.cached_property
    def digest(self) -> str:
        """What a loader state records instead of the shard list itself."""
        return hashlib.sha256(json.dumps([list(self.names), list(self.docs_per_shard)]).encode()).hexdigest()[:32]


def shard_order(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, source, epoch, 0x5EED]).permutation(n)


class EpochLayout:
    """A source's documents in one epoch: shard k of the epoch's order covers positions
    [starts[k], starts[k + 1])."""

    def __init__(self, shards: SourceShards, seed: int, source: int, epoch: int) -> None:
        self.order = shard_order(seed, source, epoch, len(shards.docs_per_shard))
        counts = np.asarray(shards.docs_per_shard, dtype=np.int64)[self.order]
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def runs(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(shard index in the manifest, first doc, end doc) pieces covering positions [lo, hi)."""
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(self.starts[k + 1]))
            if end > lo:
                yield int(self.order[k]), lo - int(self.starts[k]), end - int(self.starts[k])
            lo = end
            k += 1


def share(total: int, stream: int, streams: int) -> tuple[int, int]:
    return stream * total // streams, (stream + 1) * total // streams


def block_order(seed: int, source: int, epoch: int, streams: int, stream: int, block: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, source, epoch + 1, streams, stream, block, 0xB10C]).permutation(n)


@dataclasses.dataclass
class Cursor:
    """Where one reader of one layout's share of one source stands."""

    streams: int  # S of the layout whose share this is
    stream: int  # s in [0, S)
    epoch: int = 0
    block: int = 0  # shuffle block within the epoch's share
    offset: int = 0  # documents of that block already emitted
    until: int = OPEN  # last epoch to read (a re-split cursor); OPEN: the stream's own, epoch after epoch

    def to_json(self) -> list[int]:
        return [self.streams, self.stream, self.epoch, self.block, self.offset, self.until]

    @classmethod
    def from_json(cls, d: list[int]) -> Cursor:
        return cls(*d)

    @property
    def finished(self) -> bool:
        return self.until != OPEN and self.epoch > self.until

    def lanes_of(self, total: int, lanes: int) -> list[tuple[int, int]]:
        lo, hi = share(total, self.stream, self.streams)
        n = hi - lo
        return [(lo + j * n // lanes, lo + (j + 1) * n // lanes) for j in range(lanes)]

    def blocks(self, total: int, lanes: int, block_size: int) -> int:
        per_lane = -(-block_size // lanes)
        longest = max((b - a for a, b in self.lanes_of(total, lanes)), default=0)
        return -(-longest // per_lane)

    def block_positions(self, total: int, lanes: int, block_size: int, seed: int, source: int) -> list[int]:
        """The epoch positions of the cursor's current block, in the order they are emitted."""
        per_lane = -(-block_size // lanes)
        positions: list[int] = []
        for a, b in self.lanes_of(total, lanes):
            start = a + self.block * per_lane
            positions += range(start, min(b, start + per_lane))
        order = block_order(seed, source, self.epoch, self.streams, self.stream, self.block, len(positions))
        return [positions[i] for i in order]


def resplit_cursors(old: list[list[Cursor]], new_streams: int) -> list[list[Cursor]]:
    """One source: the cursor lists of all old streams (in stream order) -> those of `new_streams`.
    Every unfinished old cursor is continued, unchanged, up to the most advanced old epoch; each new
    stream then reads epoch top + 1 onwards under the new layout as its own cursor."""
    live = [c for cursors in old for c in cursors if not c.finished]
    top = max((c.epoch for c in live), default=0)
    handed = [dataclasses.replace(c, until=top if c.until == OPEN else c.until) for c in live]
    return [handed[s::new_streams] + [Cursor(new_streams, s, epoch=top + 1)] for s in range(new_streams)]
