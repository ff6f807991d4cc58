"""Re-splits keep the passes level (issue 26, defect 0): after a resume on another world size or
worker count, every document's read count stays within one of every other's, but for the few
documents each stream has in hand, and the unread rest of every epoch is shared evenly.

    .venv/bin/python -m pytest tests/test_loader_resplit.py -q

Ranks step together (each rank one batch per step, each worker stream in turn: transport_chunk 1),
the way training consumes the loader. On the old code (unfinished shares dealt whole to some new
streams, the others starting the next epoch at once) 2 ranks then 3 left 14 of 60 documents a pass
apart for good, and random resize sequences up to 26 of 60.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from corpus_fixtures import make_tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moma.pipeline.loader.epoch_plan import OPEN, Cursor, Shape, resplit_cursors, top_epoch
from moma.pipeline.loader.epoch_plan import unread as unread_parts
from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader
from moma.pipeline.shards.build import BuildConfig, build
from moma.pipeline.shards.inspect import iter_samples
from moma.pipeline.shards.manifest import Manifest

SEQ, BATCH, DOCS = 24, 2, 60


def _corpus(d: Path, toks: tuple[Path, Path], name: str, words: list[int]) -> Path:
    src = d / f"{name}_src"
    src.mkdir(parents=True)
    for i, n in enumerate(words):
        (src / f"doc{i:03d}.txt").write_text(" ".join(f"word{j % 17}" for j in range(n)))
    build(BuildConfig(sources=[f"text:{src}"], out=str(d / name), text_tokenizer=str(toks[0]),
                      image_tokenizer=str(toks[1]), max_docs_per_shard=7, num_partitions=2), workers=1, progress=False)
    return d / name


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`sixty`: the issue's 60 documents of 3 to 42 words; `equal`: 60 documents of 17 words, so
    that streams stepping together also read at one pace (no drift of their own to hide a re-split's)."""
    d = tmp_path_factory.mktemp("resplit")
    toks = make_tokenizers(d / "tok")
    return {"sixty": _corpus(d, toks, "sixty", [3 + (i * 7) % 40 for i in range(DOCS)]),
            "equal": _corpus(d, toks, "equal", [17] * DOCS)}


def keys_of(directory: Path) -> list[str]:
    return [f"0:{k}" for s in Manifest.load(directory).shards for k, _, _ in iter_samples(directory / s.name)]


def off_level(counts: Counter) -> int:
    """Documents whose read count is outside the best band {L, L + 1}."""
    hist = Counter(counts.values())
    return len(counts) - max(hist[level] + hist[level + 1] for level in range(max(hist) + 1))


def lockstep(directory: Path, phases: list[tuple[int, int, int]], passes: int = 3
             ) -> tuple[list[tuple[int, int]], list[str], list[list[dict]]]:
    """Phases of (world size, workers, steps), each resumed from all the previous phase's states;
    the last runs until `passes` x DOCS documents have started. Returns (documents off level,
    streams) after every step, the documents in the order they started, and the new streams'
    states right after each re-split."""
    counts = Counter({k: 0 for k in keys_of(directory)})
    starts: list[str] = []
    trace: list[tuple[int, int]] = []
    resplits: list[list[dict]] = []
    states: list[dict] | None = None
    for i, (world, workers, steps) in enumerate(phases):
        c = DataConfig(sources=(DataSource(str(directory)),), seq_len=SEQ, shuffle_buffer=5, num_workers=workers,
                       transport_chunk=1)
        per_rank = max(1, workers)
        same = states is not None and (states[0]["world_size"], states[0]["per_rank"]) == (world, per_rank)
        loaders = [PackedLoader(c, BATCH, rank=r, world_size=world, state=states[r] if same else states)
                   for r in range(world)]
        if states is not None and not same:
            resplits.append([s for lo in loaders for s in lo.stream_states.values()])
        its = [iter(lo) for lo in loaders]
        step = 0
        while step < steps if i < len(phases) - 1 else len(starts) < passes * DOCS:
            for it in its:
                for _ in range(per_rank):  # one batch of each of the rank's streams
                    keys = next(it)["doc_keys"]
                    starts += keys
                    counts.update(keys)
            trace.append((off_level(counts), world * per_rank))
            step += 1
        states = [lo.state_dict() for lo in loaders]
    return trace, starts, resplits


def assigned(state: dict, source: int = 0) -> Counter:
    """Documents of each old epoch a new stream was given by a re-split (its pieces' counts)."""
    out: Counter = Counter()
    for c in map(Cursor.from_json, state["cursors"][source]):
        if c.left != OPEN:
            out[c.epoch] += c.left
    return out


def assert_rest_shared_evenly(new_states: list[dict]) -> None:
    per_stream = [assigned(st) for st in new_states]
    for epoch in set().union(*per_stream):
        got = [a[epoch] for a in per_stream]
        assert max(got) - min(got) <= 1, (epoch, got)


def histogram_at_passes(starts: list[str], keys: list[str], passes: int = 3) -> list[dict[int, int]]:
    out = []
    for k in range(1, passes + 1):
        counts = Counter({key: 0 for key in keys})
        counts.update(starts[:k * DOCS])
        out.append(dict(sorted(Counter(counts.values()).items())))
    return out


@pytest.mark.parametrize("phases", [[(2, 0, 7), (3, 0, 0)], [(2, 0, 5), (3, 0, 5), (1, 0, 5), (2, 0, 5), (1, 0, 0)]],
                         ids=["2-3", "2-3-1-2-1"])
def test_the_issues_resizes_keep_every_document_within_a_pass(corpora: dict, phases: list) -> None:
    """The issue's scenario (documents of many lengths). Old code, at 60/120/180 starts: 2 -> 3
    {0: 14, 1: 32, 2: 14}, {1: 14, 2: 32, 3: 14}, {2: 14, 3: 32, 4: 14}; 2 -> 3 -> 1 -> 2 -> 1
    {0: 3, 1: 54, 2: 3}, {1: 11, 2: 38, 3: 11}, {2: 14, 3: 32, 4: 14}. Now at most the natural
    drift of streams reading documents of other lengths (<= 2 per stream at batch size 2)."""
    trace, starts, resplits = lockstep(corpora["sixty"], phases)
    for new_states in resplits:
        assert_rest_shared_evenly(new_states)
    print(histogram_at_passes(starts, keys_of(corpora["sixty"])))
    assert all(off <= BATCH * streams for off, streams in trace), trace


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phases=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([0, 0, 2]), st.integers(0, 9)),
                       min_size=1, max_size=5))
def test_any_sequence_of_resizes_keeps_every_document_within_a_pass(corpora: dict, phases: list) -> None:
    """Equal-length documents, so streams stepping together read at one pace: at every step all
    documents but at most one per stream (the one it has in hand) are within one read of each
    other, and each re-split shared every unfinished epoch's rest to within one document."""
    trace, _, resplits = lockstep(corpora["equal"], phases)
    for new_states in resplits:
        assert_rest_shared_evenly(new_states)
    assert all(off <= streams for off, streams in trace), (phases, trace)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), total=st.integers(1, 400), lanes=st.integers(1, 4), block=st.integers(1, 12),
       sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5))
def test_resplit_pieces_cover_each_unread_document_once(data: st.DataObject, total: int, lanes: int, block: int,
                                                        sizes: list[int]) -> None:
    """Pure arithmetic: old streams at random places (own cursors at epochs 0..2), then a chain of
    re-splits. After each, the new pieces read out are exactly the (position, epoch) pairs the old
    cursors had still to read of the epochs up to the most advanced one, each new stream's count
    per epoch within one of the others', each cut adding at most one piece."""
    shape = Shape(total, lanes, block)
    sizes = [min(s, total) for s in sizes]
    cursors = []
    for s in range(sizes[0]):
        c = Cursor(sizes[0], s, epoch=data.draw(st.integers(0, 2)))
        n = c.size(shape)
        done = data.draw(st.integers(0, n))
        c.block, c.offset = c.place(done, shape) if done < n else (c.blocks(total, lanes, block), 0)
        cursors.append([c])
    for new_streams in sizes[1:]:
        live = [c for cs in cursors for c in cs if not c.finished]
        top = top_epoch(live, shape)
        expected = pending(live, shape, top)
        cuts = sum(sum(1 for *_, n in parts if n > 0) + new_streams - 1
                   for parts in unread_parts(live, shape, top).values())
        cursors = resplit_cursors(cursors, new_streams, shape)
        assert all(cs[-1] == Cursor(new_streams, j, top + 1) for j, cs in enumerate(cursors))
        assert pending([c for cs in cursors for c in cs[:-1]], shape, top) == expected
        assert sum(len(cs) - 1 for cs in cursors) <= cuts  # a few cursors, never lists of documents
        per_epoch = [Counter() for _ in cursors]
        for j, cs in enumerate(cursors):
            for c in cs[:-1]:
                per_epoch[j][c.epoch] += c.left
        for epoch in set().union(*per_epoch):
            got = [p[epoch] for p in per_epoch]
            assert max(got) - min(got) <= 1


def pending(cursors: list[Cursor], shape: Shape, top: int) -> Counter:
    """(position, epoch) pairs the cursors will read of epochs <= top, from the shares' orders."""
    out: Counter = Counter()
    for c in cursors:
        i = c.index(shape)
        if c.left != OPEN:
            out.update((p, c.epoch) for p in _order(c, shape)[i:i + c.left])
            continue
        for e in range(c.epoch, top + 1):
            out.update((p, e) for p in _order(dataclasses_replace(c, epoch=e), shape)[i if e == c.epoch else 0:])
    return out


def dataclasses_replace(c: Cursor, **kw: int) -> Cursor:
    return Cursor(**{**c.__dict__, **kw})


def _order(c: Cursor, shape: Shape) -> list[int]:
    """The share's whole reading order (the positions of every block in turn)."""
    out: list[int] = []
    for b in range(c.blocks(shape.total, shape.lanes, shape.block_size)):
        out += dataclasses_replace(c, block=b).block_positions(shape.total, shape.lanes, shape.block_size, 0, 0)
    return out


def test_the_state_stays_small_through_resplits(tmp_path: Path) -> None:
    """10^5 shards of 100 documents, 64 x 4 streams, then quick re-splits (each stream reading one
    document of its first piece in between): each stream's state stays a few cursors (<= 4 KB),
    and all streams' pieces of an epoch grow by at most the new stream count per re-split — never
    with the number of shards or documents (a stream inheriting a whole fragmented epoch from P old
    streams holds about P pieces, as it must to name P gaps)."""
    from moma.pipeline.loader.stream import fresh_state, resplit_states

    shape = Shape(100_000 * 100, 4, 1000)
    states = [fresh_state(1, s, 256, 8) for s in range(256)]
    for s, state in enumerate(states):  # each old stream somewhere in its share of epoch 3
        state["cursors"][0][0][2:5] = [3, s % 7, s % 11]
    pieces = 0
    for new in (128, 32, 256, 64, 256):
        states = resplit_states(states, new, 8, [shape])
        now = sum(len(state["cursors"][0]) - 1 for state in states)
        assert now <= pieces + 256 + new  # the old own cursors' rests (256 at first), then a cut per new stream
        assert max(len(json.dumps(state)) for state in states) <= 4096
        for state in states:  # each stream reads a little, as the next run would before the next preemption
            c = Cursor.from_json(state["cursors"][0][0])
            if c.left not in (OPEN, 0):
                c.offset, c.left = c.offset + 1, c.left - 1
                state["cursors"][0][0] = c.to_json()
        pieces = sum(1 for state in states for c in map(Cursor.from_json, state["cursors"][0]) if c.left > 0)


def test_a_version_2_state_resumes_exactly(corpora: dict) -> None:
    """States written by the previous loader version (cursors [S, s, epoch, block, offset, until])
    are read as this version's: the same batches follow."""
    c = DataConfig(sources=(DataSource(str(corpora["sixty"])),), seq_len=SEQ, shuffle_buffer=5, num_workers=0)
    old = [PackedLoader(c, BATCH, rank=r, world_size=2) for r in range(2)]
    for lo in old:
        for _ in zip(range(9), lo):
            pass
    one = PackedLoader(c, BATCH, state=[lo.state_dict() for lo in old])  # a re-split: pieces now
    it = iter(one)
    for _ in range(2):
        next(it)
    state = one.state_dict()
    expected = [next(it)["doc_keys"] for _ in range(12)]
    shape = one.shapes[0]
    v2 = json.loads(json.dumps(state))
    v2["version"] = 2
    for stream in v2["streams"].values():  # its pieces as version 2 wrote them: to a share's end, until an epoch
        cursors = [Cursor.from_json(x) for x in stream["cursors"][0]]
        pieces, own = cursors[:-1], cursors[-1]
        assert pieces and all(p.index(shape) + p.left == p.size(shape) for p in pieces)  # each to its share's end
        stream["cursors"][0] = [[p.streams, p.stream, p.epoch, p.block, p.offset, p.epoch] for p in pieces] + \
            [[*own.to_json()[:5], OPEN]]
    resumed = PackedLoader(c, BATCH, state=v2)
    assert [b["doc_keys"] for _, b in zip(range(12), resumed)] == expected
