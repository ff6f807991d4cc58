"""The output does not depend on --num-partitions (issue 26, defect 3): random layouts with nested
folders, repeated file names, symlinks inside and outside the source root and COCO files listing an
image id twice (across the 256-image unit boundary) give the same documents under the same unique
keys, byte for byte, and a byte-identical rejects.jsonl, for 1, 2, 3 and 7 partitions.

    .venv/bin/python -m pytest tests/test_shards_partitions.py -q
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from corpus_fixtures import CAPTIONS, make_tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_fixtures import jpeg_bytes, photo_like

from moma.pipeline.shards.build import BuildConfig, build
from moma.pipeline.shards.inspect import iter_samples
from moma.pipeline.shards.manifest import Manifest

PARTITIONS = (1, 2, 3, 7)
NAMES = ("x.txt", "y.txt", "z.jsonl")
FOLDERS = ("", "a", "b", "a/b", "b/a")


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tokenizers(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return [jpeg_bytes(photo_like((40, 30), seed=i)) for i in range(3)]


def write_file(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":  # a good line, a bad one, another good one
        path.write_text(json.dumps({"text": CAPTIONS[i % 8]}) + "\n{bad\n" + json.dumps({"text": f"line {i}"}) + "\n")
    else:
        path.write_text(f"{CAPTIONS[i % 8]} {i}\n")


layouts = st.fixed_dictionaries({
    "files": st.lists(st.tuples(st.sampled_from(FOLDERS), st.sampled_from(NAMES)), min_size=1, max_size=6,
                      unique=True),
    # (folder, name, target): a link inside the root to a file of the root (by index) or outside it
    "links": st.lists(st.tuples(st.sampled_from(FOLDERS), st.sampled_from(NAMES), st.integers(0, 9),
                                st.booleans()), max_size=4),
    "dir_link": st.booleans(),
    "coco_images": st.integers(260, 300),
    "coco_duplicates": st.lists(st.tuples(st.integers(0, 299), st.integers(0, 299)), min_size=1, max_size=4),
})


def write_layout(d: Path, layout: dict, photos: list[bytes]) -> list[str]:
    root, outside = d / "root", d / "outside"
    for i, (folder, name) in enumerate(layout["files"]):
        write_file(root / folder / name, i)
    for i, (folder, name) in enumerate((("p", "x.txt"), ("q", "x.txt"), ("p", "z.jsonl"))):  # same names, outside
        write_file(outside / folder / name, 50 + i)
    outside_files = sorted(p for p in outside.rglob("*") if p.is_file())
    inside_files = sorted(p for p in root.rglob("*") if p.is_file())
    for folder, name, target, out in layout["links"]:
        link = root / "links" / folder / name
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        pool = outside_files if out else inside_files
        link.symlink_to(pool[target % len(pool)])
    if layout["dir_link"]:
        (root / "linked_dir").symlink_to(outside / "p", target_is_directory=True)
    # COCO: most images absent (cheap rejects), one in 100 present; some ids listed twice, far apart
    coco = d / "coco"
    (coco / "images").mkdir(parents=True)
    n = layout["coco_images"]
    images = [{"id": i + 1, "file_name": f"{i:012d}.jpg"} for i in range(n)]
    images.append(dict(images[255]))  # id 256 twice: sorted by id, one lands in each 256-image unit
    for a, b in layout["coco_duplicates"]:
        images.insert(b % (len(images) + 1), dict(images[a % n]))
    present = (0, 100, 200, 255)  # 255: id 256, the one listed twice
    for k, i in enumerate(present):
        (coco / "images" / f"{i:012d}.jpg").write_bytes(photos[k % len(photos)])
    anns = [{"id": 10 * i + c, "image_id": i + 1, "caption": f"{CAPTIONS[i % 8]} {c}"} for i in range(n)
            for c in range(1 + (i in present))]
    (coco / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return [f"text:{root}", f"coco:{coco / 'captions_val2017.json'}"]


def outputs(out: Path) -> tuple[dict[str, tuple[bytes, bytes]], bytes, dict]:
    docs: dict[str, tuple[bytes, bytes]] = {}
    manifest = Manifest.load(out)
    for s in manifest.shards:
        for key, tokens, meta in iter_samples(out / s.name):
            assert key not in docs, f"key {key} written twice"
            docs[key] = (tokens.tobytes(), meta)
    totals = {k: v for k, v in manifest.totals.items()}
    return docs, (out / "rejects.jsonl").read_bytes(), totals


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts)
def test_the_output_does_not_depend_on_the_partition_count(toks: tuple[Path, Path], photos: list[bytes],
                                                          layout: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        sources = write_layout(d, layout, photos)
        results = []
        for n in PARTITIONS:
            build(BuildConfig(sources=sources, out=str(d / f"p{n}"), text_tokenizer=str(toks[0]),
                              image_tokenizer=str(toks[1]), num_partitions=n, max_docs_per_shard=4,
                              max_reject_fraction=1.0), progress=False)
            results.append(outputs(d / f"p{n}"))
        first_docs, first_rejects, first_totals = results[0]
        for n, (docs, rej, totals) in zip(PARTITIONS[1:], results[1:]):
            assert sorted(docs) == sorted(first_docs), n
            assert docs == first_docs, n
            assert rej == first_rejects, n
            assert totals == first_totals, n
        # every text file as the user sees it (links included) is one record, under its own path
        root = d / "root"
        seen = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix == ".txt"}
        metas = [json.loads(meta) for _, meta in first_docs.values()]
        ids = {m["id"] for m in metas if m["source"].startswith("text:")}
        assert seen <= ids
        # each COCO image id listed twice: written once, the repeat rejected as a duplicate
        rejected = [json.loads(line) for line in first_rejects.splitlines()]
        assert all(r["reason"] in ("bad_json", "missing_image", "duplicate_id") for r in rejected)
        assert first_totals["inputs"] == first_totals["docs"] + first_totals["rejected"]


def test_symlinks_to_two_files_of_one_name_outside_the_root_are_two_records(tmp_path: Path,
                                                                             toks: tuple[Path, Path]) -> None:
    """The issue's case (a): a/x.txt and b/x.txt link to two different files outside the source."""
    for sub, text in (("p", "two dogs in a park"), ("q", "a boat on a lake")):
        write_file(tmp_path / "outside" / sub / "x.txt", 0)
        (tmp_path / "outside" / sub / "x.txt").write_text(text)
        (tmp_path / "root" / ("a" if sub == "p" else "b")).mkdir(parents=True)
        (tmp_path / "root" / ("a" if sub == "p" else "b") / "x.txt").symlink_to(tmp_path / "outside" / sub / "x.txt")
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        manifest = build(BuildConfig(sources=[f"text:{tmp_path / 'root'}"], out=str(out), text_tokenizer=str(toks[0]),
                                     num_partitions=n), progress=False)
        ids = sorted(json.loads(meta)["id"] for s in manifest.shards for _, _, meta in iter_samples(out / s.name))
        assert ids == ["a/x.txt", "b/x.txt"] and manifest.totals["rejected"] == 0, (n, ids)


def test_a_coco_image_id_listed_twice_across_units_is_written_once(tmp_path: Path, toks: tuple[Path, Path],
                                                                   photos: list[bytes]) -> None:
    """The issue's case (b): image id 256 listed twice, so that one copy falls in each 256-image unit."""
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "a.jpg").write_bytes(photos[0])
    images = [{"id": i, "file_name": "a.jpg" if i == 256 else "absent.jpg"} for i in range(1, 301)]
    images.append({"id": 256, "file_name": "a.jpg"})
    anns = [{"id": 1, "image_id": 256, "caption": "a plate of food"}]
    (coco / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        manifest = build(BuildConfig(sources=[f"coco:{coco / 'captions_val2017.json'}"], out=str(out),
                                     text_tokenizer=str(toks[0]), image_tokenizer=str(toks[1]), num_partitions=n,
                                     max_reject_fraction=1.0), progress=False)
        keys = [key for s in manifest.shards for key, _, _ in iter_samples(out / s.name)]
        assert len(keys) == 1 and manifest.totals["rejects_by_reason"] == {"duplicate_id": 1, "missing_image": 299}, \
            (n, keys, manifest.totals)


def test_a_symlinked_file_keeps_the_id_of_its_link(tmp_path: Path) -> None:
    from moma.pipeline.readers.base import ReaderOptions, make_reader

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "target.txt").write_text("x")
    (tmp_path / "root" / "a").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "target.txt", tmp_path / "root" / "a" / "link.txt")
    reader = make_reader(f"text:{tmp_path / 'root'}", ReaderOptions(), 0)
    assert [reader.rel(u) for u in reader.units()] == ["a/link.txt"]


def test_a_key_written_by_two_partitions_is_refused_at_merge(tmp_path: Path, toks: tuple[Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety net behind the readers' unique ids: if a reader ever gave two units' records one id,
    the merge refuses (naming the key) instead of writing it twice."""
    from moma.pipeline.readers.text import TextReader
    from moma.pipeline.shards.build import BuildError

    for name in ("a.txt", "b.txt"):
        write_file(tmp_path / "root" / name, 0)
    monkeypatch.setattr(TextReader, "rel", lambda self, path: "same.txt")  # a reader bug: one id for two files
    cfg = BuildConfig(sources=[f"text:{tmp_path / 'root'}"], out=str(tmp_path / "p2"), text_tokenizer=str(toks[0]),
                      num_partitions=2)
    with pytest.raises(BuildError, match=r"key s00_same-txt_\w+ is written by partitions 0 and 1"):
        build(cfg, progress=False)
    assert not (tmp_path / "p2" / "manifest.json").exists()
    one = build(BuildConfig(sources=cfg.sources, out=str(tmp_path / "p1"), text_tokenizer=str(toks[0]),
                            num_partitions=1, max_reject_fraction=1.0), progress=False)
    assert one.totals["docs"] == 1 and one.totals["rejects_by_reason"] == {"duplicate_id": 1}
