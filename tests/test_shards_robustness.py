"""Shard builder under hostile layouts and inputs: every good record written exactly once whatever the
folder layout, partition count, rerun or corrupt input (each case reproduced on the old code first).

    .venv/bin/python -m pytest tests/test_shards_robustness.py
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_fixtures import CAPTIONS, make_tokenizers, png, write_coco, write_img2dataset

from moma.pipeline.readers.base import ReaderOptions
from moma.pipeline.shards.build import BuildConfig, BuildError, _load_tokenizers, build, run_partition
from moma.pipeline.shards.inspect import iter_samples
from moma.pipeline.shards.manifest import Manifest
from moma.pipeline.shards.tar_reader import TarFormatError, tar_members


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tokenizers(tmp_path_factory.mktemp("tok"))


def config(sources: list[str], out: Path, toks: tuple[Path, Path], **kw: object) -> BuildConfig:
    kw = {"num_partitions": 4, "max_docs_per_shard": 5, **kw}
    return BuildConfig(sources=sources, out=str(out), text_tokenizer=str(toks[0]), image_tokenizer=str(toks[1]),
                       **kw)


def written(out: Path) -> dict[str, dict]:
    """key -> the document's json meta, over every shard of a finished build."""
    docs: dict[str, dict] = {}
    for s in Manifest.load(out).shards:
        for key, _, meta in iter_samples(out / s.name):
            assert key not in docs, f"key {key} written twice"
            docs[key] = json.loads(meta)
    return docs


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


# --- 1. record ids: unique and stable whatever the layout and the partition count ------------------

def nested_corpus(d: Path) -> list[str]:
    """Same file names in different folders of one source: a/part.txt + b/part.txt, two img2dataset
    folders each with 00000.tar, two COCO splits in one folder whose images share file names and ids."""
    for sub, text in (("a", "two dogs in a park\n"), ("b", "a boat on a lake\n")):
        (d / "text" / sub).mkdir(parents=True)
        (d / "text" / sub / "part.txt").write_text(text * 3)
    write_img2dataset(d / "i2d" / "x", n=2)
    write_img2dataset(d / "i2d" / "y", n=2)
    write_coco(d / "coco", n=2, missing=0)
    first = d / "coco" / "annotations" / "captions_val2017.json"
    data = json.loads(first.read_text())
    for ann in data["annotations"]:
        ann["caption"] += " (train)"
    (d / "coco" / "annotations" / "captions_train2017.json").write_text(json.dumps(data))
    return [f"text:{d / 'text'}", f"img2dataset:{d / 'i2d'}", f"coco:{d / 'coco' / 'annotations'}"]


@pytest.mark.parametrize("partitions", [1, 16])
def test_same_file_names_in_other_folders_are_different_records(tmp_path: Path, toks: tuple[Path, Path],
                                                                 partitions: int) -> None:
    sources = nested_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    manifest = build(config(sources, out, toks, num_partitions=partitions), progress=False)
    docs = written(out)
    # 2 text files + 2 x 2 img2dataset samples + 2 splits x 2 images x 2 captions, none lost, none twice
    assert manifest.totals["rejected"] == 0, rejects(out)
    assert len(docs) == manifest.totals["docs"] == 2 + 4 + 8
    ids = Counter((m["source"], m["id"]) for m in docs.values())
    assert set(ids.values()) == {1}
    text_ids = sorted(m["id"] for m in docs.values() if m["source"].startswith("text:"))
    assert text_ids == ["a/part.txt", "b/part.txt"]  # relative to the source root: stable and unique


def test_the_partition_count_does_not_change_what_is_written(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    sources = nested_corpus(tmp_path / "corpus")
    keys = []
    for n in (1, 3, 16):
        build(config(sources, tmp_path / f"p{n}", toks, num_partitions=n), progress=False)
        keys.append(sorted(written(tmp_path / f"p{n}")))
    assert keys[0] == keys[1] == keys[2]


# --- 2. a rebuild with other settings never returns (or mixes into) the old build ------------------

def test_rebuild_with_other_settings_after_all_partitions_finished_is_refused(tmp_path: Path,
                                                                                 toks: tuple[Path, Path]) -> None:
    sources = nested_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    first = config(sources, out, toks)
    for i in range(first.num_partitions):  # every partition done, the merge never ran (a killed SLURM job)
        build(first, partition=i, progress=False)
    other = config(sources, out, toks, options=ReaderOptions(order="text-first"))
    with pytest.raises(BuildError, match=r"options\.order: staged 'image-first', now 'text-first'"):
        build(other, progress=False)
    with pytest.raises(BuildError, match=r"options\.order"):
        build(other, partition=0, progress=False)  # a finished partition, asked again with other flags
    assert not (out / "manifest.json").exists()
    # --overwrite starts over with the new settings; nothing of the old build survives
    manifest = build(other, progress=False, overwrite=True)
    assert manifest.build["settings"]["options"]["order"] == "text-first"
    assert all(m["text_tokens"] for m in written(out).values())
    # and a finished build with other settings is refused too, naming the difference, unless --overwrite
    with pytest.raises(BuildError, match=r"max_docs_per_shard: built 5, now 7"):
        build(config(sources, out, toks, max_docs_per_shard=7, options=other.options), progress=False)


def test_a_staged_build_with_other_tokenizers_is_refused(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    """The same tokenizer path, retrained in place: identities are compared, not only paths."""
    from moma.tokenizers.bpe_train import train_bpe

    sources = nested_corpus(tmp_path / "corpus")
    text_tok = tmp_path / "text_tok"
    shutil.copytree(toks[0], text_tok)
    first = BuildConfig(sources=sources, out=str(tmp_path / "shards"), text_tokenizer=str(text_tok),
                        image_tokenizer=str(toks[1]), max_docs_per_shard=5, num_partitions=4)
    for i in range(first.num_partitions):
        build(first, partition=i, progress=False)
    shutil.rmtree(text_tok)
    (tmp_path / "corpus2.txt").write_text("entirely different words\n" * 50)
    train_bpe([str(tmp_path / "corpus2.txt")], 300, text_tok, progress=False)
    _load_tokenizers.cache_clear()  # a new process would load the new files
    with pytest.raises(BuildError, match=r"vocab\.text\.sha256: staged"):
        build(first, progress=False)


# --- 3. a reader error rejects its unit and the build goes on --------------------------------------

def corrupt_row_group(path: Path, rg: int) -> None:
    meta = pq.ParquetFile(path).metadata.row_group(rg)
    columns = [meta.column(c) for c in range(meta.num_columns)]
    start = min(c.dictionary_page_offset or c.data_page_offset for c in columns)
    data = bytearray(path.read_bytes())
    for i in range(start, start + sum(c.total_compressed_size for c in columns)):
        data[i] = 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_row_group_is_one_reject_and_the_rest_is_written(tmp_path: Path,
                                                                            toks: tuple[Path, Path]) -> None:
    d = tmp_path / "pq"
    d.mkdir()
    table = pa.table({"jpg": pa.array([png(i) for i in range(6)], pa.binary()),
                      "caption": [CAPTIONS[i] for i in range(6)]})
    pq.write_table(table, d / "a.parquet", row_group_size=2, compression="snappy")
    corrupt_row_group(d / "a.parquet", 1)
    pq.write_table(table, d / "b.parquet", row_group_size=3)
    cut = d / "c.parquet"  # a truncated footer: even listing its row groups fails
    pq.write_table(table, cut, row_group_size=3)
    cut.write_bytes(cut.read_bytes()[:-20])
    out = tmp_path / "shards"
    manifest = build(config([f"parquet:{d}"], out, toks), progress=False)
    bad = {r["record_id"]: r["reason"] for r in rejects(out)}
    assert bad == {"a.parquet#1": "unreadable_unit", "c.parquet": "unreadable_unit"}, rejects(out)
    assert all(r["detail"] for r in rejects(out))
    t = manifest.totals
    assert t["docs"] == 4 + 6 and t["inputs"] == t["docs"] + t["rejected"]
    with pytest.raises(BuildError, match="max-reject-fraction"):  # still decides the exit status
        build(config([f"parquet:{d}"], tmp_path / "strict", toks, max_reject_fraction=0.1), progress=False)


# --- 4. COCO annotations of images that are not listed ----------------------------------------------

def test_coco_annotations_without_an_image_entry_are_rejected(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    path = write_coco(tmp_path / "coco", n=3, missing=0)
    data = json.loads(path.read_text())
    data["annotations"] += [{"id": 900 + c, "image_id": 77, "caption": f"orphan {c}"} for c in range(3)]
    path.write_text(json.dumps(data))
    out = tmp_path / "shards"
    manifest = build(config([f"coco:{path}"], out, toks), progress=False)
    t = manifest.totals
    assert t["docs"] == 6 and t["rejects_by_reason"] == {"missing_image_entry": 3}
    assert t["inputs"] == 9 == t["docs"] + t["rejected"]


# --- 5. corrupt tar headers: an error, never a hang, a crash or a backwards seek -------------------

def _tar_with_pax(records: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k.tokens.npy")
        info.size = 4
        info.pax_headers = {"comment": "x" * 10}
        tar.addfile(info, io.BytesIO(b"abcd"))
    data = bytearray(buf.getvalue())
    assert data[156:157] == b"x"
    size = int(data[124:136].split(b"\0")[0], 8)
    body = records.ljust(size, b"\0")[:size]
    data[512:512 + size] = body
    return bytes(data)


@pytest.mark.parametrize("records,why", [
    (b"0 \n", "bad pax record"),             # length 0: looped forever
    (b"ab comment=x\n", "bad pax record"),   # non-numeric: a plain ValueError killed the worker
    (b"5 x\n", "record"),                    # longer than it says / no '='
    (b"14 size=-1024\n", "size"),            # a negative size seeked backwards
    (b"13 size=12ab\n", "size"),             # a non-numeric size
])
def test_a_corrupt_pax_header_is_a_tar_format_error(records: bytes, why: str) -> None:
    data = _tar_with_pax(records)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("tar reader hangs")))
    signal.alarm(10)
    try:
        with pytest.raises(TarFormatError, match=why):
            list(tar_members(io.BytesIO(data)))
    finally:
        signal.alarm(0)


# --- 6. size limits: an over-limit record is a reject, never a full read --------------------------

def test_over_limit_inputs_are_rejected_without_reading_them_whole(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    d = tmp_path / "big"
    d.mkdir()
    (d / "small.txt").write_text("two dogs in a park\n")
    (d / "large.txt").write_text("a" * 3000)
    with gzip.open(d / "bomb.txt.gz", "wb", compresslevel=9) as f:  # 200 MB of zeros in ~200 KB
        chunk = b"\0" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
    (d / "lines.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "b" * 5000}) + "\n"
                                   + json.dumps({"text": "also fine"}) + "\n")
    i2d = write_img2dataset(tmp_path / "i2d", n=3)
    with tarfile.open(i2d, "a") as tar:
        data = b"\xff" * 5000
        info = tarfile.TarInfo("huge.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("huge.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cap"))
    out = tmp_path / "shards"
    tracemalloc.start()
    manifest = build(config([f"text:{d}", f"img2dataset:{i2d}"], out, toks,
                            options=ReaderOptions(max_record_bytes=2000)), progress=False)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    assert peak_mb < 50, f"the gzip bomb was inflated in memory (peak {peak_mb:.0f} MB)"
    bad = {r["record_id"]: r["reason"] for r in rejects(out)}
    assert bad == {"large.txt": "too_large", "bomb.txt.gz": "too_large", "lines.jsonl:2": "too_large",
                   "00000.tar/huge": "too_large"}, bad
    assert manifest.totals["docs"] == 1 + 2 + 3
    # the limit is the user's to raise
    raised = build(config([f"text:{d / 'large.txt'}"], tmp_path / "raised", toks), progress=False)
    assert raised.totals["docs"] == 1


# --- 7. one partition, one owner --------------------------------------------------------------------

def test_a_partition_held_by_a_live_process_is_refused_naming_it(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    sources = nested_corpus(tmp_path / "corpus")
    cfg = config(sources, tmp_path / "shards", toks)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = cfg.staging / "part-00001.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": 0}))
        with pytest.raises(BuildError, match=rf"partition 1 .* is held by pid {holder.pid} on "):
            run_partition(cfg, 1)
        assert not (cfg.staging / "part-00001").exists()  # the holder's staging is left alone
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up (SIGKILL, requeue): its lock is stale and taken over
    result = run_partition(cfg, 1)
    assert (cfg.staging / "part-00001" / "done.json").exists() and not lock.exists()
    assert result.index == 1
