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
block (Cursor.block_positions). The share's reading order is block 0's documents, then block 1's,
...; a Cursor — (S, s, epoch, block, offset, left) — is a place in it, and the whole state of a
stream's reading position.

Re-splitting (resume on another world size or worker count): every epoch up to the most advanced
old one (`top`) is finished in the old layouts, and the unread rest of each is shared evenly by the
new streams — cut at document granularity, each cut described by pieces (cursors with a count
`left`), never by lists of documents. A new stream reads its part of the oldest unfinished epoch,
then of the next, then epoch top + 1 onwards under the new layout: no document repeated, none
skipped, and no stream starts an epoch while another still holds more than its share of the
previous one, after any number of re-splits in a row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator

import numpy as np

OPEN = -1  # Cursor.left of a stream's own cursor: it reads epoch after epoch


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


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a share's reading order depends on besides its seed: the source's document count, the
    lanes a stream reads side by side and the shuffle block size."""

    total: int
    lanes: int
    block_size: int

    @property
    def per_lane(self) -> int:  # documents of each lane in one block
        return -(-self.block_size // self.lanes)


@dataclasses.dataclass
class Cursor:
    """Where one reader of one layout's share of one source stands. A stream's own cursor
    (left = OPEN) reads its share epoch after epoch; a re-split *piece* reads the next `left`
    documents of one share of one epoch, in that share's order, and is then finished.

    A share's reading order is a sequence of its n documents (block 0's shuffled order, then block
    1's, ...); (block, offset) is a place in it, `index` the same place as a number in [0, n]."""

    streams: int  # S of the layout whose share this is
    stream: int  # s in [0, S)
    epoch: int = 0
    block: int = 0  # shuffle block within the epoch's share
    offset: int = 0  # documents of that block already emitted
    left: int = OPEN  # documents still to emit (a piece); OPEN: the stream's own, epoch after epoch

    def to_json(self) -> list[int]:
        return [self.streams, self.stream, self.epoch, self.block, self.offset, self.left]

    @classmethod
    def from_json(cls, d: list[int]) -> Cursor:
        return cls(*d)

    @property
    def finished(self) -> bool:
        return self.left == 0

    def lanes_of(self, total: int, lanes: int) -> list[tuple[int, int]]:
        lo, hi = share(total, self.stream, self.streams)
        n = hi - lo
        return [(lo + j * n // lanes, lo + (j + 1) * n // lanes) for j in range(lanes)]

    def blocks(self, total: int, lanes: int, block_size: int) -> int:
        per_lane = -(-block_size // lanes)
        longest = max((b - a for a, b in self.lanes_of(total, lanes)), default=0)
        return -(-longest // per_lane)

    def size(self, shape: Shape) -> int:
        """n: the documents of the share."""
        lo, hi = share(shape.total, self.stream, self.streams)
        return hi - lo

    def emitted_before(self, block: int, shape: Shape) -> int:
        """Documents of the share in blocks [0, block): each lane gives per_lane to a block."""
        return sum(min(b - a, block * shape.per_lane) for a, b in self.lanes_of(shape.total, shape.lanes))

    def block_len(self, shape: Shape) -> int:
        return self.emitted_before(self.block + 1, shape) - self.emitted_before(self.block, shape)

    def index(self, shape: Shape) -> int:
        return self.emitted_before(self.block, shape) + self.offset

    def place(self, index: int, shape: Shape) -> tuple[int, int]:
        """(block, offset) of the index-th document of the share's reading order (0 <= index < n)."""
        lo, hi = 0, self.blocks(shape.total, shape.lanes, shape.block_size) - 1  # every block below holds one
        while lo < hi:  # the last block whose first document is at or before `index`
            mid = (lo + hi + 1) // 2
            if self.emitted_before(mid, shape) <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo, index - self.emitted_before(lo, shape)

    def block_positions(self, total: int, lanes: int, block_size: int, seed: int, source: int) -> list[int]:
        """The epoch positions of the cursor's current block, in the order they are emitted."""
        per_lane = -(-block_size // lanes)
        positions: list[int] = []
        for a, b in self.lanes_of(total, lanes):
            start = a + self.block * per_lane
            positions += range(start, min(b, start + per_lane))
        order = block_order(seed, source, self.epoch, self.streams, self.stream, self.block, len(positions))
        return [positions[i] for i in order]


def unread(cursors: list[Cursor], shape: Shape, top: int) -> dict[int, list[tuple[Cursor, int, int]]]:
    """What the cursors have still to read of epochs <= top, by epoch: (a cursor of the share,
    first index in its reading order, count). An own cursor leaves the rest of its epoch and its
    whole share of every later epoch up to top."""
    rest: dict[int, list[tuple[Cursor, int, int]]] = {}
    for c in cursors:
        if c.finished:
            continue
        first = c.index(shape)
        if c.left != OPEN:
            rest.setdefault(c.epoch, []).append((c, first, c.left))
            continue
        for epoch in range(c.epoch, top + 1):
            rest.setdefault(epoch, []).append((dataclasses.replace(c, epoch=epoch), first, c.size(shape) - first))
            first = 0
    return rest


def top_epoch(cursors: list[Cursor], shape: Shape) -> int:
    """The most advanced epoch the cursors have begun (an own cursor that has not read a document
    of its epoch yet has begun only the one before): the last epoch a re-split finishes in the old
    layouts. -1 when nothing has been read."""
    return max((c.epoch - (c.left == OPEN and c.index(shape) == 0) for c in cursors if not c.finished), default=-1)


def resplit_cursors(old: list[list[Cursor]], new_streams: int, shape: Shape) -> list[list[Cursor]]:
    """One source: the cursor lists of all old streams (in stream order) -> those of `new_streams`.

    Every epoch up to the most advanced one the old streams have begun (`top`) is finished in the
    old layouts, and what is left of each is shared evenly: its unread documents — the old
    remainders in share order, adjacent ones joined — are cut into `new_streams` runs differing by
    at most one document (a cut may fall inside a shuffle block), each run described by the pieces
    it covers. New stream j reads its runs of the oldest epoch first, then of the next, ..., then
    epoch top + 1 onwards under the new layout as its own cursor: no stream starts an epoch before
    every stream has its part of the previous one's rest, and no (document, epoch) is read twice or
    skipped. The state stays a few cursors: a cut adds at most one piece, and the unread parts of one
    share that meet are joined again."""
    live = [c for cursors in old for c in cursors if not c.finished]
    top = top_epoch(live, shape)
    rest = unread(live, shape, top)
    new: list[list[Cursor]] = [[] for _ in range(new_streams)]
    for epoch in sorted(rest):
        pieces: list[tuple[Cursor, int, int]] = []  # one epoch is read under one layout: order by share
        for c, first, count in sorted(rest[epoch], key=lambda part: (part[0].streams, part[0].stream, part[1])):
            if count == 0:
                continue
            if pieces and (pieces[-1][0].streams, pieces[-1][0].stream) == (c.streams, c.stream) and \
                    pieces[-1][1] + pieces[-1][2] == first:
                pieces[-1] = (pieces[-1][0], pieces[-1][1], pieces[-1][2] + count)  # the same share, contiguous
            else:
                pieces.append((c, first, count))
        total = sum(count for *_, count in pieces)
        at = 0  # where the piece starts in the epoch's unread documents laid end to end
        for c, first, count in pieces:
            for j in range(new_streams):
                lo, hi = share(total, j, new_streams)
                lo, hi = max(lo, at), min(hi, at + count)
                if hi > lo:
                    block, offset = c.place(first + lo - at, shape)
                    new[j].append(Cursor(c.streams, c.stream, epoch, block, offset, hi - lo))
            at += count
    return [new[j] + [Cursor(new_streams, j, epoch=top + 1)] for j in range(new_streams)]


def upgrade_v2(cursors: list[list[int]], shape: Shape) -> list[list[int]]:
    """A stream's cursors of one source as loader state version 2 wrote them ([S, s, epoch, block,
    offset, until]: a handed cursor read on through epoch `until`) -> this version's, read alike."""
    out: list[list[int]] = []
    for streams, stream, epoch, block, offset, until in cursors:
        c = Cursor(streams, stream, epoch, block, offset)
        if until == OPEN:
            out.append(c.to_json())
            continue
        for parts in unread([c], shape, until).values():  # epochs epoch .. until, in order
            for piece, start, count in parts:
                if count > 0:
                    block, offset = piece.place(start, shape)
                    out.append(dataclasses.replace(piece, block=block, offset=offset, left=count).to_json())
    return out
