"""Shard builder reliability (issue 26): one bad record costs one record, file names that are not
UTF-8, partition locks that never exist without their holder, every read bounded, relative paths,
a safe reject threshold, and `moma shards verify`. Each test failed on the code before its fix.

    .venv/bin/python -m pytest tests/test_shards_reliability.py -q
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus_fixtures import (
    CAPTIONS,
    make_tokenizers,
    png,
    write_coco,
    write_folder,
    write_img2dataset,
    write_llava,
    write_mmc4,
    write_obelics,
    write_parquet,
    write_text,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from moma.pipeline.cli import main as cli_main
from moma.pipeline.readers.base import ReaderOptions
from moma.pipeline.shards.build import BuildConfig, BuildError, PartitionLock, build, run_partition
from moma.pipeline.shards.inspect import iter_samples
from moma.pipeline.shards.manifest import Manifest

DEEP = b"[" * 50_000 + b"]" * 50_000  # valid JSON; json.loads raises RecursionError


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tokenizers(tmp_path_factory.mktemp("tok"))


def config(sources: list[str], out: Path, toks: tuple[Path, Path], **kw: object) -> BuildConfig:
    kw = {"num_partitions": 2, "max_docs_per_shard": 50, **kw}
    return BuildConfig(sources=sources, out=str(out), text_tokenizer=str(toks[0]), image_tokenizer=str(toks[1]),
                       **kw)


def written(out: Path) -> dict[str, tuple[bytes, dict]]:
    """key -> (tokens.npy bytes, json meta) over every shard of a finished build."""
    docs: dict[str, tuple[bytes, dict]] = {}
    for s in Manifest.load(out).shards:
        for key, tokens, meta in iter_samples(out / s.name):
            assert key not in docs, f"key {key} written twice"
            docs[key] = (tokens.tobytes(), json.loads(meta))
    return docs


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


# --- defect 1: one bad record costs one record ------------------------------------------------------

def test_a_deeply_nested_json_line_rejects_that_line_only(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    d = tmp_path / "corpus"
    (d / "text").mkdir(parents=True)
    lines = [json.dumps({"text": f"{CAPTIONS[i % 8]} {i}"}).encode() for i in range(300)]
    lines[10] = DEEP
    (d / "text" / "lines.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # the same in an interleaved JSONL (mmc4) and in a folder's .json sidecar and an img2dataset json
    mmc4 = write_mmc4(d / "mmc4")
    mmc4.write_bytes(mmc4.read_bytes() + DEEP + b"\n" + mmc4.read_bytes())
    folder = write_folder(d / "folder", n=4)
    (folder / "deep.png").write_bytes(png(5))
    (folder / "deep.json").write_bytes(b'{"caption": ' + DEEP + b"}")
    out = tmp_path / "shards"
    manifest = build(config([f"text:{d / 'text'}", f"mmc4:{mmc4}", f"folder:{folder}"], out, toks), progress=False)
    t = manifest.totals
    bad = {(r["source"].split(":")[0], r["record_id"]): r["reason"] for r in rejects(out)}
    assert bad == {("text", "lines.jsonl:11"): "bad_json", ("mmc4", "docs.jsonl:2"): "bad_json",
                   ("folder", "deep.png"): "bad_json"}, bad
    assert t["docs"] == 299 + 2 + 4 and t["inputs"] == 300 + 3 + 5 == t["docs"] + t["rejected"]


def test_an_unreadable_unit_counts_every_record_it_held(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    from test_shards_robustness import corrupt_row_group

    d = tmp_path / "pq"
    d.mkdir()
    table = pa.table({"jpg": pa.array([png(i) for i in range(6)], pa.binary()),
                      "caption": [CAPTIONS[i] for i in range(6)]})
    pq.write_table(table, d / "a.parquet", row_group_size=2, compression="snappy")
    corrupt_row_group(d / "a.parquet", 1)  # its 2 rows cannot be read
    out = tmp_path / "shards"
    t = build(config([f"parquet:{d}"], out, toks), progress=False).totals
    assert t["docs"] == 4 and t["rejected"] == 2 and t["inputs"] == 6, t
    assert [(r["record_id"], r["reason"]) for r in rejects(out)] == [("a.parquet#1", "unreadable_unit")] * 2


def test_a_json_list_file_nested_too_deep_is_a_one_line_error_naming_it(tmp_path: Path,
                                                                      toks: tuple[Path, Path]) -> None:
    """A JSON *list* file is parsed whole when units are listed (it is one index, not a record): a
    file nested too deep is the same one-line error as invalid JSON, naming the file."""
    llava = write_llava(tmp_path / "llava")
    llava.write_bytes(DEEP)
    args = ["shards", "build", "--source", f"llava:{llava}", "--text-tokenizer", str(toks[0]), "--image-tokenizer",
            str(toks[1]), "--out", str(tmp_path / "out")]
    assert cli_main(args) == 2


# --- defect 2: file names that are not UTF-8 --------------------------------------------------------

def test_file_names_that_are_not_utf8_are_written_under_an_escaped_id(tmp_path: Path,
                                                                       toks: tuple[Path, Path]) -> None:
    from moma.pipeline.documents import escape_id, unescape_id

    d = tmp_path / "corpus"
    text = d / "text"
    text.mkdir(parents=True)
    odd = os.fsdecode(b"caf\xe9 \\ au lait.txt")  # Latin-1 name, and a backslash to keep the escape reversible
    (text / odd).write_text("two dogs in a park\n")
    (text / "good.txt").write_text("a boat on a lake\n")
    (text / os.fsdecode(b"bad\xff.jsonl")).write_bytes(b'{"text": "fine"}\n{not json\n')
    folder = write_folder(d / "folder", n=2)
    (folder / os.fsdecode(b"\xff\xfe.png")).write_bytes(png(3))
    (folder / os.fsdecode(b"\xff\xfe.txt")).write_text(CAPTIONS[3])
    out = tmp_path / "shards"
    manifest = build(config([f"text:{text}", f"folder:{folder}"], out, toks), progress=False)
    ids = sorted(meta["id"] for _, meta in written(out).values())
    assert ids == sorted([escape_id(odd), "good.txt", escape_id(os.fsdecode(b"bad\xff.jsonl")) + ":1",
                          "img0.png", "sub/img1.png", escape_id(os.fsdecode(b"\xff\xfe.png"))])
    assert escape_id(odd) == "caf\\xe9 \\\\ au lait.txt" and unescape_id(escape_id(odd)) == odd
    assert [(r["record_id"], r["reason"]) for r in rejects(out)] == \
        [(escape_id(os.fsdecode(b"bad\xff.jsonl")) + ":2", "bad_json")]
    assert manifest.totals["docs"] == 6


@settings(max_examples=300, deadline=None)
@given(names=st.lists(st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b),
                      min_size=2, max_size=2, unique=True))
def test_escaped_ids_are_utf8_reversible_and_never_shared(names: list[bytes]) -> None:
    from moma.pipeline.documents import escape_id, unescape_id

    decoded = [os.fsdecode(n) for n in names]
    escaped = [escape_id(d) for d in decoded]
    for name, d, e in zip(names, decoded, escaped):
        e.encode("utf-8")  # no lone surrogates left
        assert os.fsencode(unescape_id(e)) == name
        if "\\" not in d and d.encode("utf-8", "surrogateescape") == d.encode("utf-8", "ignore"):
            assert e == d  # a UTF-8 name without a backslash keeps its id
    assert escaped[0] != escaped[1]


# --- defect 4: a partition lock never exists without its holder record -----------------------------

KILL_AT = """
import builtins, os, signal, sys
from moma.pipeline.shards import build as b
cfg = b.BuildConfig(sources=[sys.argv[1]], out=sys.argv[2], text_tokenizer=sys.argv[3], num_partitions=1)
target, calls = int(sys.argv[4]), [0]
def killer(fn):
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
enter = b.PartitionLock.__enter__
def patched_enter(self):  # every file operation of taking the lock is a moment to die at
    saved = {n: getattr(os, n) for n in ("open", "fdopen", "write", "fsync", "link", "replace", "rename")}
    saved_open = builtins.open
    for n, fn in saved.items():
        setattr(os, n, killer(fn))
    builtins.open = killer(saved_open)
    try:
        return enter(self)
    finally:
        for n, fn in saved.items():
            setattr(os, n, fn)
        builtins.open = saved_open
        print("CALLS", calls[0], flush=True)
b.PartitionLock.__enter__ = patched_enter
b.run_partition(cfg, 0)
"""


def test_a_build_killed_while_taking_its_lock_never_blocks_the_rerun(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    text = write_text(tmp_path / "text")
    moments = 0
    for target in range(1, 20):
        out = tmp_path / f"out{target}"
        proc = subprocess.run([sys.executable, "-c", KILL_AT, f"text:{text}", str(out), str(toks[0]), str(target)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:  # taking the lock made fewer calls than `target`: every moment tried
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        moments += 1
        lock = out / ".staging" / "part-00000.lock"
        if lock.exists():  # it holds its holder record
            holder = json.loads(lock.read_text())
            assert {"host", "pid", "started"} <= holder.keys(), (target, holder)
        cfg = BuildConfig(sources=[f"text:{text}"], out=str(out), text_tokenizer=str(toks[0]), num_partitions=1)
        assert run_partition(cfg, 0).inputs == 4, target  # the rerun takes over (the killed holder is gone)
    assert moments >= 2


def test_a_full_disk_while_taking_the_lock_names_the_path_and_leaves_no_lock(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            toks: tuple[Path, Path]) -> None:
    text = write_text(tmp_path / "text")
    cfg = BuildConfig(sources=[f"text:{text}"], out=str(tmp_path / "out"), text_tokenizer=str(toks[0]),
                      num_partitions=1)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    enter = PartitionLock.__enter__

    def enter_on_full_disk(self: PartitionLock) -> PartitionLock:
        monkeypatch.setattr(os, "fsync", full)
        try:
            return enter(self)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr(PartitionLock, "__enter__", enter_on_full_disk)
    with pytest.raises(BuildError, match=r"part-00000\.lock.*No space left on device"):
        run_partition(cfg, 0)
    assert [p.name for p in cfg.staging.iterdir() if p.name != "build.json"] == []
    monkeypatch.setattr(PartitionLock, "__enter__", enter)  # space freed: the rerun works
    assert run_partition(cfg, 0).inputs == 4


def test_an_empty_lock_left_by_an_older_build_is_taken_over_once_old(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    text = write_text(tmp_path / "text")
    cfg = BuildConfig(sources=[f"text:{text}"], out=str(tmp_path / "out"), text_tokenizer=str(toks[0]),
                      num_partitions=1)
    lock = cfg.staging / "part-00000.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    os.utime(lock, (1, 1))  # left long ago
    assert run_partition(cfg, 0).inputs == 4


# --- defect 5: every read bounded by --max-record-bytes ---------------------------------------------

def test_folder_sidecars_are_bounded_by_max_record_bytes(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    folder = write_folder(tmp_path / "folder", n=2)
    (folder / "long.png").write_bytes(png(3))
    (folder / "long.txt").write_text("a" * 5000)
    (folder / "longjson.png").write_bytes(png(4))
    (folder / "longjson.json").write_text(json.dumps({"caption": "b" * 5000}))
    (folder / "huge.png").write_bytes(png(5))
    (folder / "huge.txt").write_bytes(b" " * (40 << 20))  # 40 MB: must never be loaded
    (folder / "bigimage.png").write_bytes(png(6) + b"\0" * 5000)  # an image file over the limit
    (folder / "bigimage.txt").write_text(CAPTIONS[6])
    out = tmp_path / "shards"
    tracemalloc.start()
    manifest = build(config([f"folder:{folder}"], out, toks, options=ReaderOptions(max_record_bytes=1000),
                            max_reject_fraction=1.0),
                     progress=False)
    peak_mb = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    assert peak_mb < 30, f"a sidecar was read whole (peak {peak_mb:.0f} MB)"
    assert {r["record_id"]: r["reason"] for r in rejects(out)} == {
        "long.png": "too_large", "longjson.png": "too_large", "huge.png": "too_large", "bigimage.png": "too_large"}
    assert manifest.totals["docs"] == 2


# --- defect 8: relative and absolute source paths alike, for every kind -----------------------------

def every_kind(d: Path) -> list[str]:
    parquet, jsonl = write_obelics(d / "obelics")
    return [f"coco:{write_coco(d / 'coco')}", f"folder:{write_folder(d / 'folder')}",
            f"img2dataset:{write_img2dataset(d / 'i2d')}", f"parquet:{write_parquet(d / 'parquet')}",
            f"llava:{write_llava(d / 'llava')}", f"obelics:{parquet}", f"obelics:{jsonl}",
            f"mmc4:{write_mmc4(d / 'mmc4')}", f"text:{write_text(d / 'text')}", f"mmc4:{d / 'mmc4'}",
            f"text:{d / 'text' / '*.jsonl'}"]


def test_relative_source_paths_build_the_same_as_absolute_ones_from_another_directory(
        tmp_path: Path, toks: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "work" / "data"
    absolute = every_kind(data)
    absolute_out = tmp_path / "abs"
    build(config(absolute, absolute_out, toks), progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to another working directory, through a ".."
    relative = [f"{s.split(':', 1)[0]}:{os.path.relpath(s.split(':', 1)[1])}" for s in absolute]
    assert all(".." in s for s in relative)
    manifest = build(config(relative, Path("../rel"), toks), progress=False)
    assert manifest.totals["rejects_by_reason"] == {"missing_image": 4}, rejects(tmp_path / "rel")  # COCO's absent
    assert written(tmp_path / "rel") == written(absolute_out)
    assert rejects(tmp_path / "rel") == rejects(absolute_out)
    # and the CLI, from yet another directory
    monkeypatch.chdir(data)
    args = ["shards", "build", *sum((["--source", f"{s.split(':', 1)[0]}:{os.path.relpath(s.split(':', 1)[1])}"]
                                     for s in absolute), []), "--text-tokenizer", str(toks[0]),
            "--image-tokenizer", str(toks[1]), "--out", "../../cli", "--num-partitions", "2",
            "--max-docs-per-shard", "50"]
    assert cli_main(args) == 0
    assert written(tmp_path / "cli") == written(absolute_out)


# --- defect 9: a build that lost most of its input fails loudly, after writing its report -----------

def test_a_build_that_rejects_most_inputs_fails_by_default_with_its_report(tmp_path: Path, toks: tuple[Path, Path],
                                                                           capsys: pytest.CaptureFixture) -> None:
    coco = write_coco(tmp_path / "coco", n=1, missing=15)  # 2 of 32 captions have their image
    out = tmp_path / "shards"
    args = ["shards", "build", "--source", f"coco:{coco}", "--text-tokenizer", str(toks[0]),
            "--image-tokenizer", str(toks[1]), "--out", str(out), "--num-partitions", "2"]
    assert cli_main(args) != 0
    err = capsys.readouterr()
    line = err.out + err.err
    assert "30 of 32 inputs rejected (93.8%: missing_image 30) > --max-reject-fraction 0.5" in line, line
    assert not (out / "manifest.json").exists()
    assert len(rejects(out)) == 30  # the report is written
    # accepting it is the user's call; the finished partitions are not rebuilt
    assert cli_main([*args, "--max-reject-fraction", "1"]) == 0
    line = capsys.readouterr().out
    assert "rejected 30 of 32 inputs (93.8%: missing_image 30)" in line, line
    assert Manifest.load(out).totals["docs"] == 2


def test_the_reject_threshold_default_is_documented_in_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["shards", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-reject-fraction" in text and "(default: 0.5)" in text


# --- moma shards verify -----------------------------------------------------------------------------

def test_shards_verify_names_every_bad_and_missing_shard(tmp_path: Path, toks: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "text"
    text.mkdir()
    for i in range(12):
        (text / f"t{i:02d}.txt").write_text(f"{CAPTIONS[i % 8]} {i}\n")
    out = tmp_path / "shards"
    manifest = build(BuildConfig(sources=[f"text:{text}"], out=str(out), text_tokenizer=str(toks[0]),
                                 num_partitions=2, max_docs_per_shard=3), progress=False)
    names = [s.name for s in manifest.shards]
    assert len(names) == 4
    capsys.readouterr()
    assert cli_main(["shards", "verify", str(out), "--workers", "2"]) == 0
    cap = capsys.readouterr()
    assert "verified 4 shards" in cap.out and "all match" in cap.out, cap.out
    assert "verify: done 4/4 shard" in cap.err, cap.err  # the project's progress line off a terminal
    data = bytearray((out / names[1]).read_bytes())
    data[700] ^= 0x01  # one flipped bit inside a member
    (out / names[1]).write_bytes(bytes(data))
    (out / names[3]).unlink()
    assert cli_main(["shards", "verify", str(out), "--workers", "2"]) == 1
    cap = capsys.readouterr()
    assert f"{names[1]}: sha256 mismatch" in cap.out and f"{names[3]}: missing" in cap.out, cap.out
    assert "2 of 4 shards bad" in cap.out
    assert cli_main(["shards", "verify", str(tmp_path)]) == 2  # no manifest: a one-line error
