"""Shard builder: every reader in its real format, round trip, determinism, kill-and-rerun, bad input,
interop with plain webdataset and tar, the real COCO file with missing images, SLURM-style partitions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from corpus_fixtures import (
    CAPTIONS,
    make_tokenizers,
    write_bad_corpus,
    write_coco,
    write_folder,
    write_img2dataset,
    write_llava,
    write_mmc4,
    write_obelics,
    write_parquet,
    write_text,
)

from moma.pipeline.cli import main as cli_main
from moma.pipeline.documents import Document, ImageSegment, Reject, TextSegment
from moma.pipeline.readers.base import ReaderOptions, make_reader
from moma.pipeline.shards.assemble import Tokenizers
from moma.pipeline.shards.build import BuildConfig, BuildError, build, merge
from moma.pipeline.shards.inspect import iter_samples, split_document
from moma.pipeline.shards.manifest import Manifest
from moma.tokenizers.image_preprocess import load_image
from moma.tokenizers.vocab import IdentityMismatchError

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco2017_mini"


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tokenizers(tmp_path_factory.mktemp("tok"))


def read_all(spec: str, **opts: object) -> list:
    reader = make_reader(spec, ReaderOptions(**opts), 0)
    return [r for u in reader.units() for r in reader.read(u)]


def texts_of(doc: Document) -> list[str]:
    return [s.text for s in doc.segments if isinstance(s, TextSegment)]


def kinds(doc: Document) -> str:
    return "".join("I" if isinstance(s, ImageSegment) else "T" for s in doc.segments)


# --- readers, each on its real format ------------------------------------------------------------

def test_coco_reader_each_and_all(tmp_path: Path) -> None:
    path = write_coco(tmp_path, n=3, missing=1)
    each = read_all(f"coco:{path}")
    docs = [r for r in each if isinstance(r, Document)]
    assert len(docs) == 6 and {kinds(d) for d in docs} == {"IT"}
    assert [r.reason for r in each if isinstance(r, Reject)] == ["missing_image", "missing_image"]
    # ids are relative to the source root (two caption files of one source never collide)
    assert docs[0].record_id == "captions_val2017.json:1/0" and texts_of(docs[1]) == [f"{CAPTIONS[0]} (1)"]
    grouped = [r for r in read_all(f"coco:{path}", coco_captions="all") if isinstance(r, Document)]
    assert len(grouped) == 3 and texts_of(grouped[0]) == [f"{CAPTIONS[0]} (0)\n{CAPTIONS[0]} (1)"]
    text_first = [r for r in read_all(f"coco:{path}", order="text-first") if isinstance(r, Document)]
    assert {kinds(d) for d in text_first} == {"TI"}
    mixed = [kinds(r) for r in read_all(f"coco:{path}", order="random", seed=3) if isinstance(r, Document)]
    assert set(mixed) == {"IT", "TI"} and mixed == [kinds(r) for r in read_all(f"coco:{path}", order="random",
                                                                                seed=3) if isinstance(r, Document)]


def test_folder_reader_txt_and_json_sidecars(tmp_path: Path) -> None:
    docs = read_all(f"folder:{write_folder(tmp_path)}")
    assert [d.record_id for d in docs] == ["img0.png", "img2.png", "sub/img1.png", "sub/img3.png"]
    assert texts_of(docs[3]) == [CAPTIONS[3]]  # from the .json sidecar


def test_img2dataset_reader(tmp_path: Path) -> None:
    docs = read_all(f"img2dataset:{write_img2dataset(tmp_path)}")
    assert [texts_of(d)[0] for d in docs] == CAPTIONS[:4]
    assert all(isinstance(d.segments[0].source, bytes) for d in docs)


@pytest.mark.parametrize("struct_images", [False, True])
def test_parquet_reader_streams_row_groups(tmp_path: Path, struct_images: bool) -> None:
    path = write_parquet(tmp_path, n=6, struct_images=struct_images)
    reader = make_reader(f"parquet:{path}", ReaderOptions(), 0)
    assert len(reader.units()) == 3  # one unit per row group: the file is never read whole
    docs = [r for u in reader.units() for r in reader.read(u)]
    assert len(docs) == 6 and docs[4].record_id == "part-0.parquet#2:0:k4"
    with pytest.raises(ValueError, match="no image column 'pixels'"):
        make_reader(f"parquet:{path}", ReaderOptions(image_column="pixels"), 0).units()


def test_llava_reader_places_the_image_at_its_placeholder(tmp_path: Path) -> None:
    docs = read_all(f"llava:{write_llava(tmp_path)}")
    assert kinds(docs[0]) == "TIT" and texts_of(docs[0])[0] == "USER: What is shown here?\n"
    assert texts_of(docs[0])[1] == "\nASSISTANT: a boat on a lake\n"
    assert kinds(docs[1]) == "T"


def test_obelics_reader_parquet_and_jsonl(tmp_path: Path) -> None:
    parquet, jsonl = write_obelics(tmp_path)
    assert [kinds(d) for d in read_all(f"obelics:{parquet}")] == ["TIT"]
    (doc,) = read_all(f"obelics:{jsonl}")
    assert kinds(doc) == "IT" and doc.segments[0].source == str(tmp_path / "imgs" / "p.png")


def test_mmc4_reader_puts_images_before_their_sentence(tmp_path: Path) -> None:
    (doc,) = read_all(f"mmc4:{write_mmc4(tmp_path)}")
    assert kinds(doc) == "TIT" and texts_of(doc) == ["mountains under snow. ", "a bowl of fruit. "]


def test_text_reader(tmp_path: Path) -> None:
    docs = read_all(f"text:{write_text(tmp_path)}")
    assert [d.record_id for d in docs] == ["book.txt", "lines.jsonl:1", "lines.jsonl:2", "lines.jsonl:3"]


def test_unknown_source_kind() -> None:
    with pytest.raises(ValueError, match="KIND one of"):
        make_reader("laion:/x", ReaderOptions(), 0)


# --- building ------------------------------------------------------------------------------------

def all_sources(d: Path) -> list[str]:
    parquet, jsonl = write_obelics(d / "obelics")
    return [f"coco:{write_coco(d / 'coco')}", f"folder:{write_folder(d / 'folder')}",
            f"img2dataset:{write_img2dataset(d / 'i2d')}", f"parquet:{write_parquet(d / 'pq')}",
            f"llava:{write_llava(d / 'llava')}", f"obelics:{parquet}", f"obelics:{jsonl}",
            f"mmc4:{write_mmc4(d / 'mmc4')}", f"text:{write_text(d / 'text')}"]


def config(sources: list[str], out: Path, toks: tuple[Path, Path], **kw: object) -> BuildConfig:
    return BuildConfig(sources=sources, out=str(out), text_tokenizer=str(toks[0]), image_tokenizer=str(toks[1]),
                       max_docs_per_shard=5, num_partitions=4, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return all_sources(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(corpus: list[str], toks: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "shards"
    build(config(corpus, out, toks), workers=2, progress=False)
    return out


def test_round_trip_documents_to_shards_and_back(built: Path, corpus: list[str], toks: tuple[Path, Path]) -> None:
    manifest = Manifest.load(built)
    tk = Tokenizers.load(*toks)
    assert manifest.totals["inputs"] == manifest.totals["docs"] + manifest.totals["rejected"]
    assert manifest.totals["rejects_by_reason"] == {"missing_image": 4}  # write_coco's 2 absent images x 2 captions
    by_id = {}
    for s in manifest.shards:
        for _, tokens, meta in iter_samples(built / s.name):
            by_id[(json.loads(meta)["source"], json.loads(meta)["id"])] = tokens
    assert len(by_id) == manifest.totals["docs"]
    # every document decodes back to its reader's segments: text exactly, images as their codes
    readers = [make_reader(spec, ReaderOptions(), i) for i, spec in enumerate(corpus)]
    for reader in readers:
        for unit in reader.units():
            for doc in reader.read(unit):
                if isinstance(doc, Reject):
                    continue
                tokens = by_id[(doc.source, doc.record_id)]
                assert tokens[0] == tk.vocab.bos_id and tokens[-1] == tk.vocab.eos_id
                parts = split_document(tokens, tk.vocab)
                assert [k[0].upper() for k, _ in parts] == list(kinds(doc)), doc.record_id
                for (kind, ids), seg in zip(parts, doc.segments):
                    if kind == "text":
                        assert tk.text.decode(ids.tolist()) == seg.text
                    else:
                        expected = tk.image.encode([load_image(seg.source, 16)])[0]
                        assert np.array_equal(ids, expected)


def test_build_is_deterministic_across_worker_counts(built: Path, corpus: list[str], toks: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    again = tmp_path / "again"
    build(config(corpus, again, toks), workers=1, progress=False)
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (built / name).read_bytes() == (again / name).read_bytes(), name


def test_plain_webdataset_and_tar_read_our_shards(built: Path) -> None:
    manifest = Manifest.load(built)
    first = built / manifest.shards[0].name
    ours = {key: tokens for key, tokens, _ in iter_samples(first)}
    ds = wds.WebDataset(str(first), shardshuffle=False).decode()
    theirs = {s["__key__"]: s["tokens.npy"] for s in ds}
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) and theirs[k].dtype == np.uint32 for k in ours)
    listing = subprocess.run(["tar", "tf", str(first)], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 2 * len(ours) and all(n.endswith((".tokens.npy", ".json")) for n in listing)


def test_consumer_with_other_tokenizers_is_refused(built: Path, toks: tuple[Path, Path], tmp_path: Path) -> None:
    other_text, _ = make_tokenizers(tmp_path)  # same recipe, but the BPE corpus is identical ...
    manifest = Manifest.load(built)
    tk = Tokenizers.load(other_text, toks[1])
    manifest.check_tokenizers(tk.vocab, built, "same")  # ... so the identities agree
    from moma.tokenizers.bpe_train import train_bpe

    (tmp_path / "c.txt").write_text("different text entirely\n" * 50)
    train_bpe([str(tmp_path / "c.txt")], 300, tmp_path / "t2", progress=False)
    with pytest.raises(IdentityMismatchError, match="manifest.json has tiktoken.*run.yaml has tiktoken"):
        manifest.check_tokenizers(Tokenizers.load(tmp_path / "t2", toks[1]).vocab, built, "run.yaml")


def test_bad_input_corpus(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    bad = write_bad_corpus(tmp_path / "bad")
    out = tmp_path / "shards"
    # more than half of this corpus is bad on purpose: accepted explicitly (the default, 0.5, would refuse it)
    manifest = build(config(bad["sources"], out, toks, max_reject_fraction=1.0), workers=1, progress=False)
    t = manifest.totals
    assert t["rejects_by_reason"] == dict(sorted(bad["rejects"].items()))
    assert t["docs"] == bad["good"] and t["inputs"] == t["docs"] + t["rejected"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == t["rejected"] and all({"source", "record_id", "reason"} <= r.keys() for r in rejects)
    by_record = {r["record_id"]: r["reason"] for r in rejects if r["source"].startswith("folder:")}
    for name, reason in bad["bad_images"].items():
        assert by_record[name] == reason
    # past the threshold the build fails loudly and writes no manifest
    strict = tmp_path / "strict"
    with pytest.raises(BuildError, match="max-reject-fraction"):
        build(config(bad["sources"], strict, toks, max_reject_fraction=0.1), workers=1, progress=False)
    assert not (strict / "manifest.json").exists()


@pytest.mark.skipif(not COCO_MINI.exists(), reason="../shared/data/coco2017_mini not present")
def test_real_coco_file_with_missing_images(tmp_path: Path, toks: tuple[Path, Path]) -> None:
    spec = f"coco:{COCO_MINI / 'meta' / 'captions_val2017_official.json'}"
    records = read_all(spec)
    docs = [r for r in records if isinstance(r, Document)]
    missing = {r.record_id.split("/")[0] for r in records if isinstance(r, Reject)}
    assert len({d.record_id.split("/")[0] for d in docs}) == 159  # present images
    assert len(missing) == 5000 - 159 and {r.reason for r in records if isinstance(r, Reject)} == {"missing_image"}


def test_slurm_style_partitions_then_merge(corpus: list[str], toks: tuple[Path, Path], built: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    base = ["shards", "build", *sum((["--source", s] for s in corpus), []), "--text-tokenizer", str(toks[0]),
            "--image-tokenizer", str(toks[1]), "--out", str(out), "--num-partitions", "4", "--max-docs-per-shard", "5"]
    for i in (2, 0, 3):
        assert cli_main([*base, "--partition", str(i)]) == 0
    assert cli_main(["shards", "merge", str(out)]) == 2  # partition 1 is missing: refused, named
    assert cli_main([*base, "--partition", "1"]) == 0
    assert cli_main(["shards", "merge", str(out)]) == 0
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in built.iterdir())


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_the_same_shards(corpus: list[str], toks: tuple[Path, Path],
                                                               built: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moma.pipeline.cli", "shards", "build", *sum((["--source", s] for s in corpus), []),
           "--text-tokenizer", str(toks[0]), "--image-tokenizer", str(toks[1]), "--out", str(out),
           "--num-partitions", "4", "--max-docs-per-shard", "5", "--workers", "1"]
    staging = out / ".staging"

    def run_until(moment) -> bool:  # start the build, SIGKILL it the moment `moment()` holds
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while proc.poll() is None and not moment():
            time.sleep(0.005)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return alive

    def in_progress(since: float) -> bool:  # a partition (re)started after `since` and not done
        for p in staging.glob("part-*"):
            try:
                if p.stat().st_mtime > since and not (p / "done.json").exists():
                    return True
            except FileNotFoundError:  # being redone from scratch right now
                pass
        return False

    # once right after a partition completed, once in the middle of a partition (its folder made,
    # maybe a tar or a .tmp in it, no done.json). Not "while a .tmp exists": writing a 5-document
    # tar is too brief for a poll to catch reliably.
    assert run_until(lambda: any(staging.glob("part-*/done.json")))
    done_before = len(list(staging.glob("part-*/done.json")))
    since = time.time()
    assert run_until(lambda: len(list(staging.glob("part-*/done.json"))) == done_before and in_progress(since))
    assert not (out / "manifest.json").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in built.iterdir())
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in built.iterdir())
    assert not list(out.glob(".*"))  # no temporary or staging files left


def test_merge_refuses_without_any_partition(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no partition"):
        merge(tmp_path)


def test_tar_members_have_fixed_headers(built: Path) -> None:
    with tarfile.open(built / Manifest.load(built).shards[0].name) as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "moma", "moma", 0o444)}
