"""One stream: mix the sources' documents, pack them into windows, batch the windows — with a small
state after every batch from which the exact continuation can be rebuilt.

Documents of the stream's sources are drawn by a seeded weighted coin (its generator state is part
of the stream state) and handed to `batch_size` independent packers, one per batch row: a row's
packer takes the next document whenever its window needs more tokens, so the rows of a batch come
from different documents (a long book fills one row batch after batch, not whole batches). Each
packer cuts its documents into windows of seq_len + 1 tokens: a document longer than a window
continues in that row's next window; with keep_images_whole, a cut that would fall inside a
<|boi|> ... <|eoi|> span moves the span to the next window and pads (a span longer than a window is
cut anyway). input_ids = window[:-1], labels = window[1:], pad labels = -100.

State (a few hundred bytes, whatever the data): per source its cursors (epoch_plan.Cursor: re-split
pieces, then the stream's own), the coin's generator state, and per packer the pieces of documents
it still holds as references (source, shard, document, first token, end token) — never the tokens
themselves.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moma.pipeline.loader.epoch_plan import OPEN, Cursor, EpochLayout, Shape, SourceShards, resplit_cursors
from moma.pipeline.loader.shard_reader import SegmentReader, ShardDataError
from moma.tokenizers.vocab import IGNORE_INDEX

if TYPE_CHECKING:
    from moma.pipeline.loader.loader import DataConfig

Ref = tuple[int, int, int]  # (source, shard, document): a document anywhere in the data


@dataclasses.dataclass(frozen=True)
class StreamInput:
    """A source as every stream sees it: its shard files, their document counts, its draw weight,
    and (data.verify_shards) the sha256 manifest.json records for each shard."""

    shard_paths: tuple[str, ...]
    shards: SourceShards
    weight: float
    shard_sha256: tuple[str, ...] = ()  # empty: shards are not verified


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
    def lanes(self) -> int:  # shards read side by side by one stream
        return self.data.open_shards

    @property
    def keep_images_whole(self) -> bool:
        return self.data.keep_images_whole

    @property
    def strict(self) -> bool:
        return self.data.strict


class SourceDocuments:
    """Endless documents of one source for one stream: its re-split pieces first, then its own
    cursor, epoch after epoch, a shuffle block at a time."""

    def __init__(self, src: StreamInput, index: int, cfg: StreamConfig, cursors: list[Cursor], bad: Counter,
                 readers: ShardReaders) -> None:
        self.src, self.index, self.cfg = src, index, cfg
        self.cursors = cursors
        self.bad = bad
        self.readers = readers
        self.shape = Shape(src.shards.total, cfg.lanes, cfg.block_size)
        self._layouts: dict[int, EpochLayout] = {}
        self._block: list[tuple[Ref, tuple[str, np.ndarray]] | None] = []
        self._block_id: tuple = ()  # (S, s, epoch, block) of the documents in _block
        self._span = (0, 0)  # the offsets within that block that _block holds

    def _layout(self, epoch: int) -> EpochLayout:
        if epoch not in self._layouts:
            if len(self._layouts) > 4:
                self._layouts.clear()
            self._layouts[epoch] = EpochLayout(self.src.shards, self.cfg.seed, self.index, epoch)
        return self._layouts[epoch]

    def _load_block(self, c: Cursor, size: int) -> None:
        """Read what the cursor will emit of its block (from its offset to the block's end, or to
        the piece's end): each lane's documents in sequence from its shards, kept in the block's
        shuffled order."""
        layout = self._layout(c.epoch)
        positions = c.block_positions(layout.total, self.cfg.lanes, self.cfg.block_size, self.cfg.seed, self.index)
        end = size if c.left == OPEN else min(size, c.offset + c.left)
        wanted = positions[c.offset:end]
        lane_starts = [a for a, _ in c.lanes_of(layout.total, self.cfg.lanes)]
        got: dict[int, tuple[Ref, tuple[str, np.ndarray]] | None] = {}
        for lo, hi in _runs_of(sorted(wanted)):  # a lane's documents are consecutive: it reads forward
            lane = bisect.bisect_right(lane_starts, lo) - 1
            pos = lo
            for shard, first, last in layout.runs(lo, hi):
                for i, item in enumerate(self.readers.read(("lane", lane), self.index, shard, first, last - first)):
                    got[pos] = None if item is None else ((self.index, shard, first + i), item)
                    pos += 1
        self._block = [got[p] for p in wanted]
        self._block_id, self._span = (c.streams, c.stream, c.epoch, c.block), (c.offset, end)

    def next_document(self) -> tuple[Ref, tuple[str, np.ndarray], int]:
        """The next readable document: its reference, (key, tokens), and the epoch it belongs to."""
        empty_epochs = 0
        while True:
            c = next((c for c in self.cursors if not c.finished), None)
            if c is None:  # cannot happen: the stream's own cursor is open-ended
                raise RuntimeError("no open cursor")
            size = c.block_len(self.shape)
            if size == 0:  # past the share's last block
                if c.left != OPEN:  # a piece ends inside its share
                    raise RuntimeError(f"re-split piece {c.to_json()} runs past its share")
                c.epoch, c.block, c.offset = c.epoch + 1, 0, 0  # this share of the epoch is done
                empty_epochs += 1
                if empty_epochs > 2:  # whole epochs without one readable document: do not spin
                    raise ShardDataError(f"source {self.index} gave stream {c.stream} of {c.streams} no "
                                         f"readable document in {empty_epochs} epochs (bad data so far: "
                                         f"{dict(self.bad)})")
                continue
            if c.offset >= size:
                c.block, c.offset = c.block + 1, 0
                continue
            if self._block_id != (c.streams, c.stream, c.epoch, c.block) or \
                    not self._span[0] <= c.offset < self._span[1]:
                self._load_block(c, size)
            item = self._block[c.offset - self._span[0]]
            c.offset += 1
            if c.left != OPEN:
                c.left -= 1
            if item is not None:
                return item[0], item[1], c.epoch


def _runs_of(sorted_positions: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions, as [lo, hi) ranges."""
    runs: list[tuple[int, int]] = []
    for p in sorted_positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class ShardReaders:
    """Open shard readers, by purpose: one per lane of each source (read forward, so a lane streams
    through its shard), one per source for documents that packers restore from references."""

    def __init__(self, sources: list[StreamInput], cfg: StreamConfig, bad: Counter) -> None:
        self.sources, self.cfg, self.bad = sources, cfg, bad
        self._open: dict[tuple, tuple[int, SegmentReader]] = {}
        self._verified: set[Path] = set()  # shards hashed once (data.verify_shards)

    def read(self, purpose: tuple, source: int, shard: int, first: int, count: int
             ) -> list[tuple[str, np.ndarray] | None]:
        key = (*purpose, source)
        held = self._open.get(key)
        if held is None or held[0] != shard:
            if held is not None:
                held[1].close()
            src = self.sources[source]
            sha256 = src.shard_sha256[shard] if src.shard_sha256 else None
            held = self._open[key] = (shard, SegmentReader(Path(src.shard_paths[shard]), self.cfg.vocab_size, self.bad,
                                                           self.cfg.strict, sha256, self._verified))
        return held[1].read(first, count)

    def close(self) -> None:
        for _, reader in self._open.values():
            reader.close()
        self._open.clear()


@dataclasses.dataclass
class Piece:
    """Tokens [start, end) of one document that a packer still holds."""

    ref: Ref
    tokens: np.ndarray  # the whole document (in memory only; the state holds `ref`, start, end)
    start: int
    end: int

    def to_json(self) -> list[int]:
        return [*self.ref, self.start, self.end]


class Packer:
    """One batch row: documents -> windows of seq_len + 1 tokens."""

    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces

    def window(self, cfg: StreamConfig, next_doc: Any, started: list[tuple[str, int]]) -> np.ndarray:
        need = cfg.seq_len + 1
        have = sum(p.end - p.start for p in self.pieces)
        while have < need:
            key, ref, tokens, epoch = next_doc()
            started.append((key, epoch))
            self.pieces.append(Piece(ref, tokens, 0, int(tokens.size)))
            have += tokens.size
        buf = np.concatenate([p.tokens[p.start:p.end] for p in self.pieces])
        cut = _image_safe_cut(buf, need, cfg) if cfg.keep_images_whole else need
        window = buf[:cut]
        self._consume(cut)
        if cut < need:
            window = np.concatenate([window, np.full(need - cut, cfg.pad_id, dtype=np.uint32)])
        return window

    def _consume(self, n: int) -> None:
        while n > 0:
            p = self.pieces[0]
            take = min(n, p.end - p.start)
            p.start += take
            n -= take
            if p.start >= p.end:
                self.pieces.pop(0)


def _image_safe_cut(buf: np.ndarray, need: int, cfg: StreamConfig) -> int:
    head = buf[:need]
    boi = np.flatnonzero(head == cfg.boi_id)
    if boi.size == 0:
        return need
    last = int(boi[-1])
    if np.any(head[last:] == cfg.eoi_id) or last == 0:
        return need  # the last image closes inside the window (or fills it from its start)
    span_end = np.flatnonzero(buf[last:] == cfg.eoi_id)
    span = int(span_end[0]) + 1 if span_end.size else buf.size - last
    return last if span <= need else need  # a span longer than a window is cut anyway


class Stream:
    """The documents -> packers -> batches pipeline of one stream, with its resumable state."""

    def __init__(self, sources: list[StreamInput], cfg: StreamConfig, stream: int, streams: int,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg, self.stream, self.streams = cfg, stream, streams
        state = state or {}
        self.bad: Counter = Counter(state.get("bad", {}))
        self.readers = ShardReaders(sources, cfg, self.bad)
        cursors = [[Cursor.from_json(c) for c in cs] for cs in state["cursors"]] if "cursors" in state else \
            [[Cursor(streams, stream)] for _ in sources]
        self.sources = [SourceDocuments(s, m, cfg, cursors[m], self.bad, self.readers)
                        for m, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.generation = int(state.get("generation", 0))  # re-splits so far: a fresh coin after each
        self.rng = np.random.default_rng([cfg.seed, stream, streams, 0x313C, self.generation])
        if "mix_rng" in state:
            self.rng.bit_generator.state = state["mix_rng"]
        refs = state.get("packers", [[] for _ in range(cfg.batch_size)])
        self.packers = [Packer(self._restore_pieces(pieces)) for pieces in refs]
        self.windows = int(state.get("windows", 0))

    def _restore_pieces(self, pieces: list[list[int]]) -> list[Piece]:
        """Re-read the documents a packer held (by reference) when the state was taken."""
        out = []
        for m, shard, doc, start, end in pieces:
            item = self.readers.read(("ref",), m, shard, doc, 1)[0]
            if item is not None and item[1].size >= end:
                out.append(Piece((m, shard, doc), item[1], start, end))
        return out

    def state(self) -> dict[str, Any]:
        return {"cursors": [[c.to_json() for c in s.cursors] for s in self.sources],
                "mix_rng": self.rng.bit_generator.state, "generation": self.generation,
                "packers": [[p.to_json() for p in packer.pieces] for packer in self.packers],
                "windows": self.windows, "bad": dict(self.bad)}

    def _next_doc(self) -> tuple[str, Ref, np.ndarray, int]:
        """The next document of a source drawn by weight; its key as "source index:shard key"
        (keys are unique within one shard directory, not across several)."""
        m = int(self.rng.choice(len(self.sources), p=self.weights)) if len(self.sources) > 1 else 0
        ref, (key, tokens), epoch = self.sources[m].next_document()
        return f"{m}:{key}", ref, tokens, epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Raw batches: `windows` [B, seq_len + 1] uint32, numpy (see `to_batch`); the documents that
        start in the batch (`doc_keys`), with the row each starts in and the epoch it belongs to."""
        while True:
            keys, rows, epochs = [], [], []
            windows = []
            for row, packer in enumerate(self.packers):
                started: list[tuple[str, int]] = []
                windows.append(packer.window(self.cfg, self._next_doc, started))
                keys += [k for k, _ in started]
                epochs += [e for _, e in started]
                rows += [row] * len(started)
            self.windows += len(self.packers)
            yield {"windows": np.stack(windows), "doc_keys": keys, "doc_rows": rows, "doc_epochs": epochs,
                   "stream": self.stream, "state": self.state()}


def fresh_state(sources: int, stream: int, streams: int, batch_size: int) -> dict[str, Any]:
    """The state of a stream that has not been read yet."""
    return {"cursors": [[Cursor(streams, stream).to_json()] for _ in range(sources)],
            "packers": [[] for _ in range(batch_size)], "generation": 0, "windows": 0, "bad": {}}


def own_epoch(state: dict[str, Any], source: int = 0) -> int:
    """The epoch a stream's own cursor of `source` is in (after any re-split work)."""
    return state["cursors"][source][-1][2]


def reading_epoch(state: dict[str, Any], epoch: int, source: int = 0) -> bool:
    """Whether the stream may still emit documents of `epoch` (or earlier) from `source`."""
    return any(not c.finished and c.epoch <= epoch for c in map(Cursor.from_json, state["cursors"][source]))


def resplit_states(old: list[dict[str, Any]], new_streams: int, batch_size: int, shapes: list[Shape]
                   ) -> list[dict[str, Any]]:
    """The states of all old streams (in stream order) -> states of `new_streams` streams: the
    unread rest of every unfinished epoch of each source shared evenly (epoch_plan.resplit_cursors;
    `shapes`: each source's), every token a packer still held dealt to one new packer, a fresh
    mixing coin (generation + 1)."""
    generation = max((int(st.get("generation", 0)) for st in old), default=0) + 1
    new = [{"cursors": [], "packers": [[] for _ in range(batch_size)], "generation": generation, "windows": 0,
            "bad": {}} for _ in range(new_streams)]
    for m, shape in enumerate(shapes):
        per_stream = resplit_cursors([[Cursor.from_json(c) for c in st["cursors"][m]] for st in old], new_streams,
                                     shape)
        for s, cursors in enumerate(per_stream):
            new[s]["cursors"].append([c.to_json() for c in cursors])
    held = [pieces for st in old for pieces in st["packers"] if pieces]
    for k, pieces in enumerate(held):
        new[k % new_streams]["packers"][(k // new_streams) % batch_size] += [list(p) for p in pieces]
    return new


def to_batch(raw: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """A raw batch -> input_ids [B, L] and labels [B, L] (pad -> IGNORE_INDEX), in the consuming
    process: workers send numpy arrays, which pickle through the pipe far faster than torch
    tensors travel through shared memory (a new segment and a passed descriptor per tensor)."""
    windows = raw.pop("windows")
    inputs, targets = windows[:, :-1], windows[:, 1:]
    labels = targets.astype(np.int64)  # one cast-and-copy each, in numpy (cheaper than torch ops here)
    np.putmask(labels, targets == pad_id, IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(inputs.astype(np.int64)), "labels": torch.from_numpy(labels), **raw}
