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

from moma.pipeline.loader.epoch_plan import SourceShards, epoch_share
from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader
from moma.pipeline.loader.shard_reader import ShardDataError
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


def epoch_docs(loaders: list[PackedLoader], plans: list[SourceShards], seed: int = 0) -> Counter:
    """Run every loader until all its streams finished epoch 0; the first share-many documents each
    stream started are its epoch 0."""
    per_stream: dict[int, list[str]] = {}
    streams = loaders[0].streams
    for loader in loaders:
        it = iter(loader)
        while not loader.stream_states or len(loader.stream_states) < loader.per_rank or \
                any(st["cursors"][0]["epoch"] == 0 for st in loader.stream_states.values()):
            batch = next(it)
            per_stream.setdefault(batch["stream"], []).extend(batch["doc_keys"])
    seen: Counter = Counter()
    for s, keys in per_stream.items():
        share = sum(e - b for _, b, e in epoch_share(plans[0], seed, 0, 0, s, streams))
        seen.update(keys[:share])
    return seen


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 2)])
def test_one_epoch_is_the_dataset_exactly(data: dict, workers: int, world: int) -> None:
    loaders = [make(cfg(data["main"], workers=workers), rank=r, world_size=world) for r in range(world)]
    seen = epoch_docs(loaders, loaders[0].plans)
    assert seen == Counter(_keys(data["main"]))  # every document once: no repeat, no gap


def _keys(directory: Path, source: int = 0) -> set[str]:
    return {f"{source}:{k}" for s in Manifest.load(directory).shards for k, _, _ in iter_samples(directory / s.name)}


def test_packing_reproduces_the_token_stream(data: dict) -> None:
    loader = make(cfg(data["main"]))
    tokens, keys = [], []
    for batch in take(loader, 40):
        ids, labels = batch["input_ids"], batch["labels"]
        assert torch.equal(labels[:, :-1], ids[:, 1:])  # labels are the inputs shifted by one
        for row in range(ids.shape[0]):
            tokens += ids[row].tolist() + [int(batch["labels"][row, -1])]
        keys += batch["doc_keys"]
    expected = np.concatenate([data["docs"][k] for k in keys]).tolist()
    assert tokens == expected[:len(tokens)]  # every token once, in order: windows are cut, never dropped
    assert data["vocab"].pad_id not in tokens  # no padding without keep_images_whole


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
            before.update(batch["doc_keys"])
    states = [lo.state_dict() for lo in old]
    # the same data, now one rank with another number of workers
    new = make(cfg(data["main"], workers=new_workers), rank=0, world_size=1, state=states)
    # what the old streams left of epoch 0 is now pending in the new ones, to be read first
    pending = {s: sum(len(p["samples"][1]) if "samples" in p else p["segment"][2] - p["segment"][1]
                      for p in st["cursors"][0]["pending"]) for s, st in new.stream_states.items()}
    per_stream: dict[int, list[str]] = {s: [] for s in pending}
    it = iter(new)
    while any(len(per_stream[s]) < pending[s] for s in pending):
        batch = next(it)
        per_stream[batch["stream"]] += batch["doc_keys"]
    after = Counter(k for s, keys in per_stream.items() for k in keys[:pending[s]])
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
    take(loader, 80)  # more than an epoch: training goes on
    counts = loader.bad_counts()
    for reason in ("truncated_tar", "bad_npy", "token_out_of_range", "empty_shard", "missing_shard"):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    with pytest.raises(Exception, match="missing"):
        make(cfg(bad, strict=True))
    (bad / names[4]).write_bytes((data["main"] / names[4]).read_bytes())
    with pytest.raises(ShardDataError, match=rf"{names[0]}|{names[1]}|{names[2]}|{names[3]}"):
        take(make(cfg(bad, strict=True)), 80)


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
    assert epoch_docs(loaders, loaders[0].plans) == Counter(_keys(one_shard))
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


def test_chunk_transport_sends_shared_leftovers_once() -> None:
    import pickle

    from moma.pipeline.loader.stream import pack_for_transport, unpack_transported

    buf = np.arange(10_003, dtype=np.uint32)  # one concatenation; batches leave shorter and shorter tails of it
    raws = [{"state": {"leftover": buf[100 * (i + 1):]}} for i in range(5)]
    raws.append({"state": {"leftover": np.arange(7, dtype=np.uint32)}})  # an array of its own
    blob = pickle.dumps(pack_for_transport(raws))
    assert len(blob) < buf.nbytes * 1.1  # the longest tail once, not five tails
    for sent, got in zip(raws, (unpack_transported(r) for r in pickle.loads(blob))):
        assert np.array_equal(sent["state"]["leftover"], got["state"]["leftover"])
