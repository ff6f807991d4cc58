"""The streaming loader: exact resume (workers 0/2, world 1/2, and onto another world size), epoch
coverage, mixing weights, packing invariants, bad shards, identity checks, layouts that would hang."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from braceexpand import braceexpand
from corpus_fixtures import make_tokenizers, write_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader
from moma.pipeline.loader.shard_reader import ShardChecksumError, ShardDataError
from moma.pipeline.loader.stream import reading_epoch
from moma.pipeline.shards.build import BuildConfig, build
from moma.pipeline.shards.inspect import iter_samples
from moma.pipeline.shards.manifest import Manifest
from moma.tokenizers.vocab import IdentityMismatchError, TokenizerIdentity, Vocab

SEQ, BATCH = 24, 2


def make_shards(d: Path, toks: tuple[Path, Path], name: str, n_text: int, images: bool, per_shard: int,
                partitions: int) -> Path:
    src = d / f"{name}_src"
    (src / "text").mkdir(parents=True)
    for i in range(n_text):  # documents of many lengths: short ones, and ones longer than a window
        (src / "text" / f"doc{i:03d}.txt").write_text(" ".join(f"word{j % 17}" for j in range(3 + (i * 7) % 40)))
    sources = [f"text:{src / 'text'}"]
    if images:
        sources.append(f"folder:{write_folder(src / 'img', n=6)}")
    out = d / name
    build(BuildConfig(sources=sources, out=str(out), text_tokenizer=str(toks[0]), image_tokenizer=str(toks[1]),
                      max_docs_per_shard=per_shard, num_partitions=partitions), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("loader")
    toks = make_tokenizers(d / "tok")
    main = make_shards(d, toks, "main", n_text=40, images=True, per_shard=6, partitions=3)
    other = make_shards(d, toks, "other", n_text=30, images=False, per_shard=50, partitions=1)
    docs = {}  # "source index:key" as the loader reports it, for main as source 0 and other as source 1
    for m, directory in enumerate((main, other)):
        for s in Manifest.load(directory).shards:
            docs.update({f"{m}:{key}": tokens.astype(np.int64) for key, tokens, _ in iter_samples(directory / s.name)})
    return {"main": main, "other": other, "docs": docs, "vocab": Manifest.load(main).vocab, "toks": toks}


def cfg(*dirs: Path | str, workers: int = 0, **kw: object) -> DataConfig:
    sources = tuple(DataSource(str(x)) if not isinstance(x, DataSource) else x for x in dirs)
    return DataConfig(sources=sources, seq_len=SEQ, shuffle_buffer=5, num_workers=workers, **kw)


def make(data: DataConfig, **kw: object) -> PackedLoader:
    return PackedLoader(data, BATCH, **kw)


def take(loader: PackedLoader, n: int, it=None) -> list[dict]:
    it = it or iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers,world,chunk", [(0, 1, None), (2, 1, None), (0, 2, None), (2, 2, None),
                                                 (2, 1, 3), (2, 2, 3)])  # chunk 3: resumed mid-chunk
def test_resume_gives_exactly_the_uninterrupted_batches(data: dict, workers: int, world: int,
                                                        chunk: int | None) -> None:
    c = cfg(data["main"], workers=workers, transport_chunk=chunk)
    for rank in range(world):
        full = make(c, rank=rank, world_size=world)
        it = iter(full)
        take(full, 7, it)
        state = full.state_dict()
        expected = take(full, 6, it)
        resumed = make(c, rank=rank, world_size=world, state=state)
        got = take(resumed, 6)
        for a, b in zip(expected, got):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert a["doc_keys"] == b["doc_keys"]


def epoch_docs(loaders: list[PackedLoader], epoch: int = 0) -> Counter:
    """Run every loader until all its streams' own cursors are past `epoch`; the documents they
    read that belong to `epoch` (each batch says which epoch each document is from)."""
    seen: Counter = Counter()
    for loader in loaders:
        it = iter(loader)
        while not loader.stream_states or len(loader.stream_states) < loader.per_rank or \
                any(reading_epoch(st, epoch) for st in loader.stream_states.values()):
            batch = next(it)
            seen.update(k for k, e in zip(batch["doc_keys"], batch["doc_epochs"]) if e == epoch)
    return seen


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 2)])
def test_one_epoch_is_the_dataset_exactly(data: dict, workers: int, world: int) -> None:
    loaders = [make(cfg(data["main"], workers=workers), rank=r, world_size=world) for r in range(world)]
    seen = epoch_docs(loaders)
    assert seen == Counter(_keys(data["main"]))  # every document once: no repeat, no gap


def _keys(directory: Path, source: int = 0) -> set[str]:
    return {f"{source}:{k}" for s in Manifest.load(directory).shards for k, _, _ in iter_samples(directory / s.name)}


def test_packing_reproduces_the_token_stream(data: dict) -> None:
    loader = make(cfg(data["main"]))
    tokens: dict[int, list[int]] = {r: [] for r in range(BATCH)}  # each row has its own packer
    keys: dict[int, list[str]] = {r: [] for r in range(BATCH)}
    for batch in take(loader, 40):
        ids, labels = batch["input_ids"], batch["labels"]
        assert torch.equal(labels[:, :-1], ids[:, 1:])  # labels are the inputs shifted by one
        for row in range(ids.shape[0]):
            tokens[row] += ids[row].tolist() + [int(batch["labels"][row, -1])]
        for key, row in zip(batch["doc_keys"], batch["doc_rows"]):
            keys[row].append(key)
    for row in range(BATCH):
        expected = np.concatenate([data["docs"][k] for k in keys[row]]).tolist()
        assert tokens[row] == expected[:len(tokens[row])]  # every token once, in order: cut, never dropped
        assert data["vocab"].pad_id not in tokens[row]  # no padding without keep_images_whole


def test_keep_images_whole(data: dict) -> None:
    v = data["vocab"]
    loader = make(cfg(data["main"], keep_images_whole=True))
    # 16 px VQ images: 64 codes + 2 > SEQ + 1, so spans are longer than a window and may be cut; a
    # bigger window shows the rule.
    big = PackedLoader(DataConfig(sources=(DataSource(str(data["main"])),), seq_len=100, shuffle_buffer=5,
                                  num_workers=0, keep_images_whole=True), batch_size=2)
    padded = 0
    for batch in take(big, 60):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            window = ids.tolist() + [labels[-1].item()]
            opens = [i for i, t in enumerate(window) if t == v.boi_id]
            closes = [i for i, t in enumerate(window) if t == v.eoi_id]
            if opens and (not closes or closes[-1] < opens[-1]):
                assert opens[-1] == 0  # an unclosed image may only be one that fills the window from its start
            padded += int((labels == -100).sum())
            assert all(labels[i] == -100 for i in range(len(labels)) if window[i + 1] == v.pad_id)
    assert padded > 0
    assert take(loader, 3)  # spans longer than the window: cut, not an endless loop


def test_mixing_weights_are_shares_of_tokens(data: dict) -> None:
    sources = (DataSource(str(data["main"]), 0.8), DataSource(str(data["other"]), 0.2))
    loader = PackedLoader(DataConfig(sources=sources, seq_len=SEQ, shuffle_buffer=5, num_workers=0), batch_size=4,
                          seed=3)
    tokens = Counter()
    for batch in take(loader, 500):
        for k in batch["doc_keys"]:
            tokens["main" if k.startswith("0:") else "other"] += data["docs"][k].size
    share = tokens["main"] / sum(tokens.values())
    assert abs(share - 0.8) < 0.05, tokens


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores: fine
@pytest.mark.parametrize("new_workers", [0, 3])  # 2 streams -> 1 stream, 2 streams -> 3 streams
def test_resume_onto_another_world_size_covers_the_epoch_once(data: dict, new_workers: int) -> None:
    c = cfg(data["main"], workers=0)
    old = [make(c, rank=r, world_size=2) for r in range(2)]
    before: Counter = Counter()
    for loader in old:
        for batch in take(loader, 5):
            before.update(k for k, e in zip(batch["doc_keys"], batch["doc_epochs"]) if e == 0)
    states = [lo.state_dict() for lo in old]
    # the same data, now one rank with another number of workers
    new = make(cfg(data["main"], workers=new_workers), rank=0, world_size=1, state=states)
    after = epoch_docs([new])
    assert before + after == Counter(_keys(data["main"]))  # epoch 0 exactly once across the re-split


def test_bad_shards_are_counted_and_skipped(data: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data["main"], bad)
    names = [s.name for s in Manifest.load(bad).shards]
    raw = (bad / names[0]).read_bytes()
    (bad / names[0]).write_bytes(raw[: len(raw) // 2])  # truncated tar
    _rewrite(bad / names[1], lambda name, b: b"not an npy" if name.endswith(".npy") else b, first_only=True)
    vocab_size = data["vocab"].size
    _rewrite(bad / names[2], lambda name, b: _npy(np.array([1, vocab_size + 5], np.uint32))
             if name.endswith(".npy") else b, first_only=True)
    (bad / names[3]).write_bytes(b"")  # empty shard
    (bad / names[4]).unlink()  # listed in the manifest, missing on disk
    loader = make(cfg(bad))
    delivered = epoch_docs([loader])  # a whole epoch, then training goes on
    take(loader, 20)
    counts = loader.bad_counts()
    for reason in ("truncated_tar", "bad_npy", "token_out_of_range", "empty_shard", "missing_shard"):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    # every good document arrives, once: the intact shards whole, the damaged ones but their damage
    expected = set()
    for i, name in enumerate(names):
        keys = [k for k, _, _ in iter_samples(data["main"] / name)]
        if i == 0:
            keys = _readable_keys(bad / name)  # the truncated one: what lies before the cut
        elif i in (1, 2):
            keys = keys[1:]  # its first document's tokens were spoiled
        elif i in (3, 4):
            keys = []  # empty, missing
        expected |= {f"0:{k}" for k in keys}
    assert len(expected) > 20 and delivered == Counter(expected)
    with pytest.raises(Exception, match="missing"):
        make(cfg(bad, strict=True))
    (bad / names[4]).write_bytes((data["main"] / names[4]).read_bytes())
    with pytest.raises(ShardDataError, match=rf"{names[0]}|{names[1]}|{names[2]}|{names[3]}"):
        take(make(cfg(bad, strict=True)), 80)


def _readable_keys(path: Path) -> list[str]:
    """The documents of a truncated tar whose tokens member is whole, by Python's tarfile."""
    keys = []
    try:
        with tarfile.open(path, "r|") as tar:
            for m in tar:
                if m.name.endswith(".tokens.npy"):
                    tar.extractfile(m).read()
                    if m.offset_data + m.size <= path.stat().st_size:
                        keys.append(m.name.split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _rewrite(path: Path, change, first_only: bool) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    done = False
    with tarfile.open(path, "w") as out:
        for m, data in members:
            if not done and m.name.endswith(".npy"):
                data, done = change(m.name, data), first_only
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))


def test_identity_mismatch_names_both(data: dict) -> None:
    v = data["vocab"]
    other = Vocab(text=TokenizerIdentity("tiktoken", "x", "f" * 64, v.text.size, v.text.extra), image=v.image)
    with pytest.raises(IdentityMismatchError, match="manifest.json has tiktoken.*run config has tiktoken:x@ffff"):
        make(cfg(data["main"]), vocab=other, consumer="run config")


def test_layouts_that_would_hang_are_refused_or_handled(data: dict, tmp_path: Path) -> None:
    one_shard = data["other"]  # 30 docs in a single shard: four streams still split it
    assert len(Manifest.load(one_shard).shards) == 1
    loaders = [make(cfg(one_shard, workers=2), rank=r, world_size=2) for r in range(2)]
    assert epoch_docs(loaders) == Counter(_keys(one_shard))
    with pytest.raises(ValueError, match="30 documents but the loader runs 64 streams"):
        make(cfg(one_shard, workers=8), rank=0, world_size=8)


def test_brace_patterns_select_shards(data: dict) -> None:
    names = [s.name for s in Manifest.load(data["main"]).shards]
    assert list(braceexpand("d/data-{000001..000003}.tar")) == [f"d/data-00000{i}.tar" for i in (1, 2, 3)]
    loader = make(cfg(f"{data['main']}/data-{{000000..000001}}.tar"))
    assert loader.resolved[0].shard_paths == tuple(str(data["main"] / n) for n in names[:2])
    with pytest.raises(ValueError, match="not listed"):
        make(cfg(f"{data['main']}/data-{{000090..000091}}.tar"))


def test_state_survives_a_weights_only_round_trip(data: dict, tmp_path: Path) -> None:
    loader = make(cfg(data["main"], workers=2))
    take(loader, 3)
    torch.save(loader.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(take(make(cfg(data["main"], workers=2), state=state), 1)[0]["input_ids"],
                       take(loader, 1)[0]["input_ids"])


# --- re-splits, state size, decorrelated rows ------------------------------------------------------

@pytest.fixture(scope="module")
def sixty(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 text documents of 3 to 42 words, 7 per shard."""
    return make_shards(tmp_path_factory.mktemp("sixty"), data["toks"], "sixty", n_text=60, images=False,
                       per_shard=7, partitions=2)


def run_layouts(directory: Path, phases: list[tuple[int, int, int]], epochs: int = 2,
                check_same_layout: bool = False) -> Counter:
    """Phases of (world size, workers, batches per rank), each resumed from the states the previous
    one left (all ranks' states: a re-split when the layout changed); the last phase runs on until
    every stream is past `epochs` - 1. Returns (document, epoch) counts."""
    seen: Counter = Counter()
    states: list[dict] | None = None
    for i, (world, workers, steps) in enumerate(phases):
        c = cfg(directory, workers=workers)
        last = i == len(phases) - 1
        next_states = []
        for rank in range(world):
            mine = states
            if states is not None and [st["world_size"] for st in states[:1]] == [world] and \
                    states[0]["per_rank"] == max(1, workers):
                mine = states[rank]  # the same layout: only this rank's own state
            loader = make(c, rank=rank, world_size=world, state=mine)
            it = iter(loader)
            for batch in take(loader, steps, it):
                seen.update(zip(batch["doc_keys"], batch["doc_epochs"]))
            if last:
                while any(reading_epoch(st, epochs - 1) for st in loader.stream_states.values()) or \
                        len(loader.stream_states) < loader.per_rank:
                    batch = next(it)
                    seen.update(zip(batch["doc_keys"], batch["doc_epochs"]))
            if check_same_layout and not last:  # the same layout continues bit-identically
                state = loader.state_dict()
                expected = take(loader, 3, it)
                got = take(make(c, rank=rank, world_size=world, state=state), 3)
                assert all(torch.equal(a["input_ids"], b["input_ids"]) and a["doc_keys"] == b["doc_keys"]
                           for a, b in zip(expected, got))
                seen.update(zip(sum((b["doc_keys"] for b in expected), []), sum((b["doc_epochs"] for b in expected),
                                                                              [])))
            next_states.append(loader.state_dict())
        states = next_states
    return Counter({k: n for k, n in seen.items() if k[1] < epochs})


def test_a_second_resplit_repeats_and_skips_nothing(sixty: Path) -> None:
    """2 streams, then 3, then 1 (the reproduction of the old bug: counts {2: 49, 3: 8, 1: 3})."""
    seen = run_layouts(sixty, [(2, 0, 4), (3, 0, 3), (1, 0, 1)])
    keys = _keys(sixty)
    assert seen == Counter({(k, e): 1 for k in keys for e in (0, 1)})
    per_doc = Counter(k for k, _ in seen.elements())
    assert set(per_doc.values()) == {2} and len(per_doc) == 60


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phases=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([0, 0, 2]), st.integers(0, 9)),
                       min_size=1, max_size=4))
def test_any_sequence_of_resizes_reads_every_document_once_per_epoch(sixty: Path, phases: list) -> None:
    seen = run_layouts(sixty, phases, check_same_layout=True)
    assert seen == Counter({(k, e): 1 for k in _keys(sixty) for e in (0, 1)}), phases


def test_resume_with_another_worker_count_on_the_same_world_size(sixty: Path) -> None:
    """Re-split of the streams of one world size: needs every rank's state, not only this rank's."""
    old = [make(cfg(sixty, workers=0), rank=r, world_size=2) for r in range(2)]
    for lo in old:
        take(lo, 3)
    states = [lo.state_dict() for lo in old]
    with pytest.raises(ValueError, match="needs the loader states of all 2 old ranks"):
        make(cfg(sixty, workers=2), rank=0, world_size=2, state=states[0])
    assert make(cfg(sixty, workers=2), rank=1, world_size=2, state=states).stream_states


def _long_document_shards(d: Path, vocab: Vocab, n_shards: int) -> Path:
    """Shard 0 holds a 10^6-token document and 3 short ones; shards 1.. are only listed (10^5 of them)."""
    import json

    from moma.pipeline.shards.writer import ShardInfo

    d.mkdir()
    docs = {"long": np.full(1_000_000, 5, dtype=np.uint32), **{f"s{i}": np.arange(3, 40, dtype=np.uint32)
                                                               for i in range(3)}}
    with tarfile.open(d / "data-000000.tar", "w") as tar:
        for key, tokens in docs.items():
            for ext, payload in (("tokens.npy", _npy(tokens)), ("json", json.dumps({"id": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shards = [ShardInfo(name="data-000000.tar", docs=4, text_tokens=10 ** 6, image_tokens=0, bytes=0, sha256="0")]
    shards += [ShardInfo(name=f"data-{i:06d}.tar", docs=3, text_tokens=30, image_tokens=0, bytes=0, sha256="0")
               for i in range(1, n_shards)]
    Manifest(vocab=vocab, shards=shards, build={"settings": {}}, totals={}).save(d)
    return d


def test_state_stays_small_whatever_the_shards_and_documents(tmp_path: Path, data: dict) -> None:
    """<= 4 KB per stream with 10^5 shard entries, and while a row holds a piece of a 10^6-token
    document: references, never tokens or shard lists."""
    import json

    vocab = data["vocab"]
    many = _long_document_shards(tmp_path / "many", vocab, 100_000)
    one = _long_document_shards(tmp_path / "one", vocab, 1)

    def loader(d: Path) -> PackedLoader:
        return PackedLoader(DataConfig(sources=(DataSource(str(d)),), seq_len=512, num_workers=0, shuffle_buffer=4,
                                       open_shards=1), batch_size=4, seed=0)

    assert len(json.dumps(loader(many).state_dict())) <= 4096
    small = loader(one)
    take(small, 5)  # the long document is in a row's packer now
    state = small.state_dict()
    held = [p for st in state["streams"].values() for packer in st["packers"] for p in packer]
    assert any(end - start > 100_000 for *_, start, end in held)  # a piece of the long document, by reference
    assert len(json.dumps(state)) <= 4096
    # and the reference resumes to the same batches
    expected = take(small, 3)
    got = take(PackedLoader(small.cfg, 4, seed=0, state=state), 3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(expected, got))


def test_the_rows_of_a_batch_never_share_a_document(data: dict) -> None:
    """Book-length documents fill one row batch after batch, not whole batches."""
    loader = PackedLoader(DataConfig(sources=(DataSource(str(data["main"])),), seq_len=8, num_workers=0,
                                     shuffle_buffer=5), batch_size=4, seed=1)
    it = iter(loader)
    holders: dict[int, str] = {}  # row -> the document its window ends in
    for _ in range(100):
        batch = next(it)
        for key, row in zip(batch["doc_keys"], batch["doc_rows"]):
            holders[row] = key
        rows = list(holders.values())
        assert len(rows) == len(set(rows)), rows  # no two rows are in the same document


def test_starting_the_loader_does_not_draw_from_torchs_global_rng(data: dict) -> None:
    """A resume restores torch's RNG, then starts the loader: that must not move the training RNG
    (the DataLoader takes its workers' base seed from the loader's own generator)."""
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    loader = make(cfg(data["main"], workers=2))
    take(loader, 1)
    assert torch.equal(torch.rand(3), expected)


# --- data.verify_shards ------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_verify_shards_refuses_a_changed_shard_naming_it(data: dict, tmp_path: Path, workers: int) -> None:
    """One flipped byte inside a document's tokens (the tar still parses, the ids stay in range):
    read silently without verification; with data.verify_shards the run stops naming the shard.
    Intact shards give the same batches either way."""
    damaged = tmp_path / "damaged"
    shutil.copytree(data["main"], damaged)
    names = [s.name for s in Manifest.load(damaged).shards]
    victim = damaged / names[2]
    raw = bytearray(victim.read_bytes())
    with tarfile.open(victim) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".tokens.npy"))
    raw[member.offset_data + member.size - 4] ^= 0x01  # the low bit of the last token id (uint16/uint32)
    victim.write_bytes(bytes(raw))
    plain = epoch_docs([make(cfg(damaged, workers=workers))])
    assert plain == Counter(_keys(data["main"]))  # nothing notices: every document arrives
    with pytest.raises(ShardChecksumError, match=rf"{names[2]}: sha256 \w+\.\.\. differs from"):
        epoch_docs([make(cfg(damaged, workers=workers, verify_shards=True))])
    a, b = make(cfg(data["main"], workers=workers)), make(cfg(data["main"], workers=workers, verify_shards=True))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and x["doc_keys"] == y["doc_keys"]
               for x, y in zip(take(a, 30), take(b, 30)))


def test_verify_shards_needs_the_manifests_checksums(data: dict, tmp_path: Path) -> None:
    import json

    bare = tmp_path / "bare"
    shutil.copytree(data["main"], bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = ""
    (bare / "manifest.json").write_text(json.dumps(manifest))
    name = manifest["shards"][1]["name"]
    with pytest.raises(ValueError, match=rf"records no sha256 for {name}"):
        make(cfg(bare, verify_shards=True))
    assert take(make(cfg(bare)), 1)  # without verification the manifest is fine as it is
