"""The output does not depend on --num-partitions (issue 26, defect 3): random layouts with nested
folders, repeated file names, symlinks inside and outside the source root and COCO files listing an
image id twice (across the 256-image unit boundary) give byte-identical shards (the same tar files
under the same names), manifest.json, sizes.json and rejects.jsonl for 1, 2, 3 and 7 partitions, with
the same documents under unique keys.

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


def outputs(out: Path) -> tuple[dict[str, tuple[bytes, bytes]], bytes, dict, dict[str, bytes]]:
    """(documents by key, rejects.jsonl, totals, every file of the output directory by name)."""
    docs: dict[str, tuple[bytes, bytes]] = {}
    manifest = Manifest.load(out)
    for s in manifest.shards:
        for key, tokens, meta in iter_samples(out / s.name):
            assert key not in docs, f"key {key} written twice"
            docs[key] = (tokens.tobytes(), meta)
    totals = {k: v for k, v in manifest.totals.items()}
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    return docs, (out / "rejects.jsonl").read_bytes(), totals, files


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
        first_docs, first_rejects, first_totals, first_files = results[0]
        assert {"manifest.json", "sizes.json", "rejects.jsonl"} < set(first_files)
        for n, (docs, rej, totals, files) in zip(PARTITIONS[1:], results[1:]):
            assert sorted(docs) == sorted(first_docs), n
            assert docs == first_docs, n
            assert rej == first_rejects, n
            assert totals == first_totals, n
            # byte-identical output directories: the same tars under the same names, manifest, sizes
            assert sorted(files) == sorted(first_files), (n, sorted(files), sorted(first_files))
            differ = [name for name in first_files if files[name] != first_files[name]]
            assert not differ, (n, differ)
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
    # a shard per document: each file is its own unit group, so the two fall into two partitions
    cfg = BuildConfig(sources=[f"text:{tmp_path / 'root'}"], out=str(tmp_path / "p2"), text_tokenizer=str(toks[0]),
                      num_partitions=2, max_docs_per_shard=1)
    with pytest.raises(BuildError, match=r"key s00_same-txt_\w+ is written by partitions 0 and 1"):
        build(cfg, progress=False)
    assert not (tmp_path / "p2" / "manifest.json").exists()
    one = build(BuildConfig(sources=cfg.sources, out=str(tmp_path / "p1"), text_tokenizer=str(toks[0]),
                            num_partitions=1, max_docs_per_shard=1, max_reject_fraction=1.0), progress=False)
    assert one.totals["docs"] == 1 and one.totals["rejects_by_reason"] == {"duplicate_id": 1}


def test_array_tasks_then_merge_give_the_bytes_of_a_one_partition_build(tmp_path: Path, toks: tuple[Path, Path],
                                                                        photos: list[bytes]) -> None:
    """The SLURM path (jobs/slurm_shards.sbatch: one `--partition i` per array task, in any order, then
    `moma shards merge`) and the local one (--workers 2, spawned processes) write the same bytes as one
    partition; a finished build asked again with another partition count is already built, while
    staged partitions of another count are refused (they cannot be mixed in)."""
    from moma.pipeline.shards.build import BuildError, merge

    layout = {"files": [(f, n) for f in FOLDERS for n in NAMES], "links": [("a", "x.txt", 1, True)],
              "dir_link": True, "coco_images": 270, "coco_duplicates": [(3, 280)]}
    sources = write_layout(tmp_path, layout, photos)

    def config(out: str, n: int) -> BuildConfig:
        return BuildConfig(sources=sources, out=str(tmp_path / out), text_tokenizer=str(toks[0]),
                           image_tokenizer=str(toks[1]), num_partitions=n, max_docs_per_shard=3,
                           max_reject_fraction=1.0)

    one = build(config("one", 1), progress=False)
    assert len(one.shards) > 5  # several groups, so the partitions below all have work
    for i in (4, 0, 3, 1, 2):
        build(config("array", 5), partition=i, progress=False)
    merge(tmp_path / "array", max_reject_fraction=1.0)
    build(config("workers", 3), workers=2, progress=False)
    files = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").iterdir())}
    for other in ("array", "workers"):
        assert {p.name: p.read_bytes() for p in sorted((tmp_path / other).iterdir())} == files, other
    assert "num_partitions" not in one.build["settings"]
    assert build(config("one", 7), progress=False).shards == one.shards  # already built: nothing to do
    build(config("staged", 2), partition=0, progress=False)
    with pytest.raises(BuildError, match=r"num_partitions: staged 2, now 3"):
        build(config("staged", 3), progress=False)


@given(weights=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3 << 20)), min_size=1, max_size=300),
       max_docs=st.integers(1, 20_000), max_bytes=st.integers(1, 1 << 30))
def test_unit_groups_are_runs_closed_at_the_targets(weights: list[tuple[int, int]], max_docs: int,
                                                    max_bytes: int) -> None:
    """groups.cut: consecutive runs from 0; each group but the last closed by the unit that brought its
    records or bytes to the target (never before); at least GROUPS groups when every unit alone fills
    a group; one group when the whole build is under both targets."""
    from moma.pipeline.shards import groups

    cut = groups.cut(weights, max_docs, max_bytes)
    by_records, by_bytes = groups.targets(weights, max_docs, max_bytes)
    assert cut[0] == 0 and all(b - a in (0, 1) for a, b in zip(cut, cut[1:]))
    for g in range(cut[-1] + 1):
        members = [w for w, c in zip(weights, cut) if c == g]
        records, size = sum(r for r, _ in members), sum(b for _, b in members)
        before = (records - members[-1][0], size - members[-1][1])
        assert before[0] < by_records and before[1] < by_bytes, g  # not closed before its last unit
        if g < cut[-1]:
            assert records >= by_records or size >= by_bytes, g
    assert by_records <= max(max_docs, 1) and by_bytes <= max(max_bytes, 1)
    if sum(r for r, _ in weights) < min(max_docs, groups.MIN_RECORDS) and \
            sum(b for _, b in weights) < min(max_bytes, groups.MIN_BYTES):
        assert cut[-1] == 0
    if all(r >= by_records or b >= by_bytes for r, b in weights):
        assert cut[-1] + 1 == len(weights)


def test_a_big_build_has_enough_groups_for_its_partitions() -> None:
    """1,000 units of 1,000 records: groups of min(max_docs, total / GROUPS) records (closed by the unit
    that reaches it), so about GROUPS partitions have work even when the shard limit is far away."""
    from moma.pipeline.shards import groups

    assert groups.GROUPS == 64
    weights = [(1000, 0)] * 1000
    assert max(groups.cut(weights, 10_000, 10**9)) + 1 == 100  # 10,000 records a group (the shard limit)
    # target ceil(10**6 / 64) = 15,625 records, reached by the 16th unit: ceil(1000 / 16) = 63 groups
    assert max(groups.cut(weights, 10**9, 10**9)) + 1 == 63
    text = [(1, 1 << 18)] * 80  # 20 MiB of 256 KiB text files: 1 MiB groups of 4 files
    assert max(groups.cut(text, 10_000, 10**9)) + 1 == 20
