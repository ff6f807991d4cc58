"""Who reads what: the deterministic epoch plan of every stream, and re-splitting it.

A *stream* is one reader of the data: rank r's DataLoader worker w is stream r * W + w of
S = world_size * max(1, num_workers). For source m in epoch e, the shards are put in an order drawn
from (seed, m, e) and their documents, concatenated, form one index space [0, N_m); stream s owns
the contiguous range [s * N_m / S, (s + 1) * N_m / S) — a list of (shard, start, end) segments.
Shares differ by at most one document, whatever the number of shards (a shard may be split over
several streams, so fewer shards than streams is fine), and they cover the epoch exactly once.

Re-splitting (resume on another world size or worker count): every old stream's unfinished work up
to the most advanced old epoch becomes *pending* work, dealt round-robin to the new streams, which
then continue with epoch (that one + 1) under the new plan: no document repeated, none skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

Segment = tuple[int, int, int]  # (shard index within the source, first doc, end doc)


@dataclasses.dataclass(frozen=True)
class SourceShards:
    """One source's shards (document counts in manifest order) and its place in the mixture."""

    docs_per_shard: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.docs_per_shard)


def shard_order(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, source, epoch, 0x5EED]).permutation(n)


def epoch_share(plan: SourceShards, seed: int, source: int, epoch: int, stream: int, streams: int) -> list[Segment]:
    """The (shard, start, end) segments stream `stream` of `streams` reads in `epoch`."""
    order = shard_order(seed, source, epoch, len(plan.docs_per_shard))
    n = plan.total
    lo, hi = stream * n // streams, (stream + 1) * n // streams
    segments, offset = [], 0
    for shard in order:
        count = plan.docs_per_shard[shard]
        a, b = max(lo, offset), min(hi, offset + count)
        if a < b:
            segments.append((int(shard), a - offset, b - offset))
        offset += count
        if offset >= hi:
            break
    return segments


@dataclasses.dataclass
class Cursor:
    """Where one stream stands in one source: an epoch's segment list, or pending work first."""

    epoch: int = 0
    segment: int = 0  # index into the epoch's segments
    block: int = 0  # shuffle block within that segment
    offset: int = 0  # documents of that block already emitted
    pending: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # re-split work, done first

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its deep copy was a third of a stream's time (a state per batch).
        # Pending items are only ever popped whole, never changed, so copying the dicts suffices.
        return {"epoch": self.epoch, "segment": self.segment, "block": self.block, "offset": self.offset,
                "pending": [dict(p) for p in self.pending]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Cursor:
        return cls(**d)


def remaining_work(plan: SourceShards, cursor: Cursor, seed: int, source: int, stream: int, streams: int,
                   block_size: int, up_to_epoch: int) -> list[dict[str, Any]]:
    """Everything `stream` still had to read up to the end of `up_to_epoch`, as pending items:
    {"samples": [shard, [doc, ...]]} for the partly read (already shuffled) block, {"segment": [...]}
    for whole unread ranges (read and block-shuffled as usual)."""
    from moma.pipeline.loader.shard_reader import block_order  # the shuffle of a block, as the stream does it

    items = [dict(p) for p in cursor.pending]
    segments = epoch_share(plan, seed, source, cursor.epoch, stream, streams)
    if cursor.segment < len(segments):
        shard, start, end = segments[cursor.segment]
        b_start = start + cursor.block * block_size
        if b_start < end:
            b_end = min(end, b_start + block_size)
            order = block_order(seed, source, cursor.epoch, stream, cursor.segment, cursor.block, b_end - b_start)
            rest = [b_start + int(i) for i in order[cursor.offset:]]
            if rest:
                items.append({"samples": [shard, rest]})
            if b_end < end:
                items.append({"segment": [shard, b_end, end]})
        items += [{"segment": list(s)} for s in segments[cursor.segment + 1:]]
    for epoch in range(cursor.epoch + 1, up_to_epoch + 1):
        items += [{"segment": list(s)} for s in epoch_share(plan, seed, source, epoch, stream, streams)]
    return items


def resplit(plans: list[SourceShards], old_states: list[dict[str, Any]], old_streams: int, new_streams: int,
            seed: int, block_size: int) -> list[dict[str, Any]]:
    """New per-stream states for `new_streams` from the saved states of all `old_streams`."""
    if len(old_states) != old_streams:
        raise ValueError(f"need the states of all {old_streams} old streams, got {len(old_states)}")
    new = [{"cursors": [], "leftover": [], "windows": 0, "resplit": True}
           for _ in range(new_streams)]
    for m, plan in enumerate(plans):
        cursors = [Cursor.from_json(st["cursors"][m]) for st in old_states]
        top = max(c.epoch for c in cursors)
        pending: list[dict[str, Any]] = []
        for s, c in enumerate(cursors):
            pending += remaining_work(plan, c, seed, m, s, old_streams, block_size, top)
        for s in range(new_streams):
            new[s]["cursors"].append(Cursor(epoch=top + 1, pending=pending[s::new_streams]).to_json())
    for s, st in enumerate(old_states):  # half-packed windows: their tokens must still be seen once
        new[s % new_streams]["leftover"] += list(st["leftover"])
    return new
