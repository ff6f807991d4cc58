"""Random corruptions of real inputs and real shards (hypothesis): nothing hangs or crashes, every
intact record is still delivered, every input is accounted for.

    .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_fixtures import CAPTIONS, make_tokenizers, png, write_folder, write_img2dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_fixtures import jpeg_bytes, photo_like

from moma.pipeline.loader.shard_reader import SegmentReader, ShardDataError
from moma.pipeline.shards.build import BuildConfig, build
from moma.pipeline.shards.inspect import iter_samples
from moma.pipeline.shards.manifest import Manifest
from moma.pipeline.shards.tar_reader import tar_members

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextmanager
def within(seconds: int):
    """Fail instead of hanging."""
    def fire(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tokenizers(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def shard(toks: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real shard of 12 caption and text documents, with each document's byte range."""
    d = tmp_path_factory.mktemp("shard")
    (d / "text").mkdir()
    for i in range(4):
        (d / "text" / f"t{i}.txt").write_text(f"{CAPTIONS[i]} " * (5 + 7 * i))
    out = d / "shards"
    build(BuildConfig(sources=[f"folder:{write_folder(d / 'folder', n=8)}", f"text:{d / 'text'}"], out=str(out),
                      text_tokenizer=str(toks[0]), image_tokenizer=str(toks[1]), num_partitions=1), progress=False)
    manifest = Manifest.load(out)
    assert len(manifest.shards) == 1
    path = out / manifest.shards[0].name
    docs = [(key, tokens.copy()) for key, tokens, _ in iter_samples(path)]
    spans = []  # (first header byte, end of the last member's padded data) per document
    with open(path, "rb") as f:
        members = [(name, read.args[1], size) for name, size, read in tar_members(f)]
    for key, _ in docs:
        mine = [(start, size) for name, start, size in members if name.split(".", 1)[0] == key]
        spans.append((min(s for s, _ in mine) - 512, max(s + -(-z // 512) * 512 for s, z in mine)))
    return {"path": path, "docs": docs, "spans": spans, "vocab": manifest.vocab.size}


corruption = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("zero_block"), st.floats(0, 1)),
)


def corrupt(data: bytes, how: tuple) -> tuple[bytes, int]:
    """The corrupted bytes and the first offset that changed."""
    kind, arg = how
    if kind == "truncate":
        at = int(arg * (len(data) - 1))
        return data[:at], at
    buf = bytearray(data)
    if kind == "flip":
        changed = []
        for where, mask in arg:
            at = int(where * (len(buf) - 1))
            buf[at] ^= mask
            changed.append(at)
        return bytes(buf), min(changed)
    blocks = max(1, -(-len(buf) // 512))
    block = min(int(arg * blocks), blocks - 1) * 512
    end = min(block + 512, len(buf))
    first = next((i for i in range(block, end) if buf[i]), None)
    buf[block:end] = bytes(end - block)
    return bytes(buf), first if first is not None else len(buf)


@FUZZ
@given(how=corruption)
def test_a_corrupt_shard_never_hangs_or_crashes_and_keeps_what_came_before(shard: dict, tmp_path: Path,
                                                                            how: tuple) -> None:
    data, first_changed = corrupt(shard["path"].read_bytes(), how)
    path = tmp_path / "bad.tar"
    path.write_bytes(data)
    n = len(shard["docs"])
    bad: Counter = Counter()
    with within(20):
        got = SegmentReader(path, shard["vocab"], bad, strict=False).read(0, n)
    assert len(got) == n
    for (key, tokens), (_, end), item in zip(shard["docs"], shard["spans"], got):
        if end <= first_changed:  # wholly before the damage: delivered, exactly
            assert item is not None and item[0] == key and (item[1] == tokens).all(), (how, key)
    lost = sum(item is None for item in got)
    if lost:  # what is not delivered is counted, by reason
        assert sum(bad.values()) >= 1 and set(bad) <= {"empty_shard", "truncated_tar", "short_shard", "bad_npy",
                                                        "missing_tokens",
                                                        "token_out_of_range"}, bad
    if sum(bad.values()):  # strict mode fails at once, naming the shard and where
        with within(20), pytest.raises(ShardDataError, match=rf"{path} \[.*\] at byte \d+: "):
            SegmentReader(path, shard["vocab"], Counter(), strict=True).read(0, n)


# --- readers ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pristine")
    write_folder(d / "folder", n=6)
    for i in range(2):  # real JPEGs too: their corruptions go through the JPEG decoder
        (d / "folder" / f"photo{i}.jpg").write_bytes(jpeg_bytes(photo_like((48, 40), seed=i)))
        (d / "folder" / f"photo{i}.txt").write_text(CAPTIONS[i] + "\n")
    (d / "pq").mkdir()
    pq.write_table(pa.table({"jpg": pa.array([png(i) for i in range(6)], pa.binary()),
                             "caption": [CAPTIONS[i] for i in range(6)]}), d / "pq" / "a.parquet", row_group_size=2)
    (d / "jsonl").mkdir()
    (d / "jsonl" / "lines.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in CAPTIONS))
    write_img2dataset(d / "i2d", n=4)
    return d


SOURCES = {"folder": "folder", "pq": "parquet", "jsonl": "text", "i2d": "img2dataset"}


def input_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".parquet", ".jsonl",
                                                                              ".tar"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, 10 ** 6), corruption), min_size=1, max_size=3),
       partitions=st.sampled_from([1, 3]))
def test_corrupt_inputs_are_rejected_with_reasons_and_every_record_is_accounted_for(
        pristine: Path, toks: tuple[Path, Path], tmp_path: Path, picks: list, partitions: int) -> None:
    root = tmp_path / "corpus"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(pristine, root)
    files = input_files(root)
    touched = set()
    for pick, how in picks:
        path = files[pick % len(files)]
        data, _ = corrupt(path.read_bytes(), how)
        path.write_bytes(data)
        touched.add(path.relative_to(root).parts[0])
    sources = [f"{kind}:{root / sub}" for sub, kind in SOURCES.items()]
    out = tmp_path / "out"
    if out.exists():
        shutil.rmtree(out)
    with within(120):
        manifest = build(BuildConfig(sources=sources, out=str(out), text_tokenizer=str(toks[0]),
                                     image_tokenizer=str(toks[1]), num_partitions=partitions,
                                     max_reject_fraction=1.0), progress=False)  # corruptions may reject most
    t = manifest.totals
    assert t["inputs"] == t["docs"] + t["rejected"]
    written = Counter(json.loads(meta)["source"] for s in manifest.shards for _, _, meta in iter_samples(out / s.name))
    rejected = Counter(json.loads(line)["source"] for line in (out / "rejects.jsonl").read_text().splitlines())
    expected_clean = {"folder": 8, "pq": 6, "jsonl": 8, "i2d": 4}
    for sub, spec in zip(SOURCES, sources):
        counts = t["by_source"][spec]
        assert counts["inputs"] == counts["docs"] + counts["rejected"], (spec, counts)
        assert counts["docs"] == written[spec] and counts["rejected"] == rejected[spec], spec
        if sub not in touched:  # an untouched source loses nothing
            assert counts == {"inputs": expected_clean[sub], "docs": expected_clean[sub], "rejected": 0}, spec
    assert all(json.loads(line)["reason"] for line in (out / "rejects.jsonl").read_text().splitlines())
