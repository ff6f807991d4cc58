"""One stream: mix the sources' documents, pack them into windows, batch the windows — with a state
after every batch from which the exact continuation can be rebuilt.

Documents of the stream's sources are drawn by a seeded weighted coin (its generator state is part
of the stream state), concatenated, and cut into windows of seq_len + 1 tokens: a document longer
than a window continues in the next; with keep_images_whole, a cut that would fall inside a
<|boi|> ... <|eoi|> span moves the span to the next window and pads (a span longer than a window
is cut anyway). input_ids = window[:-1], labels = window[1:], pad labels = -100.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moma.pipeline.loader.epoch_plan import Cursor, SourceShards, epoch_share
from moma.pipeline.loader.shard_reader import SegmentReader, ShardDataError, block_order, pending_order
from moma.tokenizers.vocab import IGNORE_INDEX

if TYPE_CHECKING:
    from moma.pipeline.loader.loader import DataConfig



@dataclasses.dataclass(frozen=True)
class StreamInput:
    shard_paths: tuple[str, ...]
    plan: SourceShards
    weight: float


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What a stream needs beyond the data section: the batch size, the seed, the vocabulary's ids."""

    data: DataConfig
    batch_size: int
    seed: int
    vocab_size: int
    pad_id: int
    boi_id: int
    eoi_id: int

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def block_size(self) -> int:  # the shuffle buffer: documents read and shuffled together
        return self.data.shuffle_buffer

    @property
    def keep_images_whole(self) -> bool:
        return self.data.keep_images_whole

    @property
    def strict(self) -> bool:
        return self.data.strict


class SourceDocuments:
    """Endless documents of one source for one stream (epoch after epoch), advancing its cursor."""

    def __init__(self, src: StreamInput, index: int, cfg: StreamConfig, stream: int, streams: int, cursor: Cursor,
                 bad: Counter) -> None:
        self.src, self.index, self.cfg = src, index, cfg
        self.stream, self.streams = stream, streams
        self.cursor = cursor
        self.bad = bad
        self._readers: dict[tuple, SegmentReader] = {}
        self._block: list[tuple[str, np.ndarray] | None] = []
        self._block_id: tuple | None = None
        self._share: tuple[int, list] = (-1, [])  # (epoch, its segments for this stream)

    def _work(self) -> tuple[tuple, int, int, int] | None:
        """The current unit of work, (id, shard, start, end), or None when the epoch share is done.
        Pending (re-split) work comes first: whole segments, or explicit documents ("samples")."""
        c = self.cursor
        if c.pending:
            item = c.pending[0]
            if "samples" in item:
                shard, docs = item["samples"]
                return ("samples", shard, tuple(docs)), shard, 0, len(docs)
            shard, start, end = item["segment"]
            return ("pending", shard, start, end), shard, start, end
        if self._share[0] != c.epoch:  # asked once per document; the share changes once per epoch
            self._share = (c.epoch, epoch_share(self.src.plan, self.cfg.seed, self.index, c.epoch, self.stream,
                                                self.streams))
        segments = self._share[1]
        if c.segment >= len(segments):
            return None
        shard, start, end = segments[c.segment]
        return ("epoch", c.epoch, c.segment), shard, start, end

    def _reader(self, work_id: tuple, shard: int) -> SegmentReader:
        if work_id not in self._readers:
            for r in self._readers.values():
                r.close()
            self._readers = {work_id: SegmentReader(Path(self.src.shard_paths[shard]), self.cfg.vocab_size,
                                                    self.bad, self.cfg.strict)}
        return self._readers[work_id]

    def _load_block(self, work_id: tuple, shard: int, start: int, end: int) -> int:
        """Read the cursor's block; return its length (0 if the unit is finished)."""
        c, size = self.cursor, self.cfg.block_size
        if work_id[0] == "samples":  # a re-split remainder: explicit documents, already in their order
            docs = work_id[2][c.block * size:(c.block + 1) * size]
            reader = self._reader(work_id, shard)
            self._block = [reader.read(d, 1)[0] for d in docs]
            return len(docs)
        b_start = start + c.block * size
        if b_start >= end:
            return 0
        b_end = min(end, b_start + size)
        raw = self._reader(work_id, shard).read(b_start, b_end - b_start)
        if work_id[0] == "epoch":
            order = block_order(self.cfg.seed, self.index, c.epoch, self.stream, c.segment, c.block, len(raw))
        else:
            order = pending_order(self.cfg.seed, self.index, shard, start, end, c.block, len(raw))
        self._block = [raw[i] for i in order]
        return len(raw)

    def _advance_unit(self) -> None:
        c = self.cursor
        if c.pending:
            c.pending.pop(0)
        else:
            c.segment += 1
        c.block = c.offset = 0
        self._block_id = None

    def next_document(self) -> tuple[str, np.ndarray]:
        empty_epochs = 0
        while True:
            work = self._work()
            c = self.cursor
            if work is None:  # this stream's share of the epoch is done
                c.epoch, c.segment, c.block, c.offset = c.epoch + 1, 0, 0, 0
                empty_epochs += 1
                if empty_epochs > 2:  # whole epochs without one readable document: do not spin forever
                    raise ShardDataError(f"source {self.index} gave stream {self.stream} no readable document in "
                                         f"{empty_epochs} epochs (bad data so far: {dict(self.bad)})")
                continue
            work_id, shard, start, end = work
            block_id = (work_id, c.block)
            if self._block_id != block_id:
                n = self._load_block(work_id, shard, start, end)
                self._block_id = block_id
                if n == 0:
                    self._advance_unit()
                    continue
            if c.offset >= len(self._block):
                c.block += 1
                c.offset = 0
                continue
            item = self._block[c.offset]
            c.offset += 1
            if item is not None:
                return item


class Stream:
    """The documents -> windows -> batches pipeline of one stream, with its resumable state."""

    def __init__(self, sources: list[StreamInput], cfg: StreamConfig, stream: int, streams: int,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg, self.stream, self.streams = cfg, stream, streams
        state = copy.deepcopy(state) if state else {}
        cursors = [Cursor.from_json(c) for c in state.get("cursors", [])] or [Cursor() for _ in sources]
        self.bad: Counter = Counter(state.get("bad", {}))
        self.sources = [SourceDocuments(s, m, cfg, stream, streams, cursors[m], self.bad)
                        for m, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.rng = np.random.default_rng([cfg.seed, stream, streams, 0x313C] + ([7] if state.get("resplit") else []))
        if "mix_rng" in state:
            self.rng.bit_generator.state = state["mix_rng"]
        self.leftover = np.asarray(state.get("leftover", []), dtype=np.uint32)  # the window being packed
        self.windows = int(state.get("windows", 0))

    def state(self) -> dict[str, Any]:
        return {"cursors": [s.cursor.to_json() for s in self.sources], "mix_rng": self.rng.bit_generator.state,
                "leftover": self.leftover, "windows": self.windows,
                "bad": dict(self.bad)}

    def _next_doc(self) -> tuple[str, np.ndarray]:
        """The next document of a source drawn by weight; its key as "source index:shard key"
        (keys are unique within one shard directory, not across several)."""
        m = int(self.rng.choice(len(self.sources), p=self.weights)) if len(self.sources) > 1 else 0
        key, tokens = self.sources[m].next_document()
        return f"{m}:{key}", tokens

    def _window(self, started: list[str]) -> np.ndarray:
        need = self.cfg.seq_len + 1
        parts, have = [self.leftover], self.leftover.size
        while have < need:
            key, tokens = self._next_doc()
            started.append(key)
            parts.append(tokens)
            have += tokens.size
        buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
        cut = need
        if self.cfg.keep_images_whole:
            cut = self._image_safe_cut(buf, need)
        window = buf[:cut]
        self.leftover = buf[cut:]
        if cut < need:
            window = np.concatenate([window, np.full(need - cut, self.cfg.pad_id, dtype=np.uint32)])
        self.windows += 1
        return window

    def _image_safe_cut(self, buf: np.ndarray, need: int) -> int:
        head = buf[:need]
        boi = np.flatnonzero(head == self.cfg.boi_id)
        if boi.size == 0:
            return need
        last = int(boi[-1])
        if np.any(head[last:] == self.cfg.eoi_id) or last == 0:
            return need  # the last image closes inside the window (or fills it from its start)
        span_end = np.flatnonzero(buf[last:] == self.cfg.eoi_id)
        span = int(span_end[0]) + 1 if span_end.size else buf.size - last
        return last if span <= need else need  # a span longer than a window is cut anyway

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Raw batches: `windows` [B, seq_len + 1] uint32, numpy (see `to_batch`)."""
        while True:
            started: list[str] = []
            windows = np.stack([self._window(started) for _ in range(self.cfg.batch_size)])
            yield {"windows": windows, "doc_keys": started, "stream": self.stream, "state": self.state()}


def pack_for_transport(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chunk of raw batches, ready to pickle. Each state carries its leftover (the unconsumed
    tail of the window being packed: up to a whole long document). The leftovers of consecutive
    batches are suffixes of one concatenation, so each is sent as (shared tail, offset), the shared
    tail starting at the chunk's first use of that concatenation: pickle sends it once."""
    shared: dict[int, tuple[np.ndarray, int]] = {}  # id(owner) -> (owner, smallest offset in the chunk)
    placed = []
    for raw in chunk:
        leftover = raw["state"]["leftover"]
        owner = leftover.base if isinstance(leftover.base, np.ndarray) else leftover
        offset = (leftover.__array_interface__["data"][0] - owner.__array_interface__["data"][0]) // owner.itemsize
        if owner.ndim != 1 or owner.dtype != leftover.dtype or offset + leftover.size != owner.size:
            placed.append(None)  # not a suffix of its owner: sent as it is
            continue
        placed.append((id(owner), offset))
        if id(owner) not in shared or offset < shared[id(owner)][1]:
            shared[id(owner)] = (owner, offset)
    tails = {key: owner[offset:] for key, (owner, offset) in shared.items()}
    out = []
    for raw, place in zip(chunk, placed):
        if place is not None:
            key, offset = place
            raw = {**raw, "state": {**raw["state"], "leftover": ("suffix", tails[key], offset - shared[key][1])}}
        out.append(raw)
    return out


def unpack_transported(raw: dict[str, Any]) -> dict[str, Any]:
    leftover = raw["state"]["leftover"]
    if isinstance(leftover, tuple):
        _, owner, offset = leftover
        raw["state"]["leftover"] = owner[offset:]
    return raw


def to_batch(raw: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """A raw batch -> input_ids [B, L] and labels [B, L] (pad -> IGNORE_INDEX), in the consuming
    process: workers send numpy arrays, which pickle through the pipe far faster than torch
    tensors travel through shared memory (a new segment and a passed descriptor per tensor)."""
    windows = raw.pop("windows")
    inputs, targets = windows[:, :-1], windows[:, 1:]
    labels = targets.astype(np.int64)  # one cast-and-copy each, in numpy (cheaper than torch ops here)
    np.putmask(labels, targets == pad_id, IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(inputs.astype(np.int64)), "labels": torch.from_numpy(labels), **raw}
