"""The loader's lean tar reader against Python's tarfile on the same archives.

    .venv/bin/python -m pytest tests/test_tar_reader.py
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from moma.pipeline.shards.tar_reader import TarFormatError, tar_members


def _with_tarfile(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _with_tar_reader(path: Path, read_every: int = 1) -> list[tuple[str, bytes | None]]:
    with open(path, "rb") as f:
        return [(name, read() if i % read_every == 0 else None) for i, (name, _, read) in enumerate(tar_members(f))]


def _archive(path: Path, fmt: int) -> None:
    names = ["a.txt", "dir/" + "long" * 40 + ".npy", "p" * 90 + "/" + "q" * 60 + ".json", "ünï.txt", "empty.bin"]
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(names):
            data = bytes(range(256)) * i * 3
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5 if fmt == tarfile.PAX_FORMAT else 0  # float mtime: a pax record
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "a.tar"
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold the long names: prefix field only
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in ["x" * 99, "pre/" * 30 + "name.npy"]:
                info = tarfile.TarInfo(name)
                info.size = 7
                tar.addfile(info, io.BytesIO(b"payload"))
    else:
        _archive(path, fmt)
    expected = _with_tarfile(path)
    assert _with_tar_reader(path) == expected
    # members whose data is not read are skipped, and the following ones still come out right
    skipped = _with_tar_reader(path, read_every=2)
    assert [n for n, _ in skipped] == [n for n, _ in expected]
    assert all(d is None or d == e for (_, d), (_, e) in zip(skipped, expected))


def test_webdataset_shard(tmp_path: Path) -> None:
    path = tmp_path / "shard.tar"
    with open(path, "wb") as f, wds.TarWriter(f, mtime=0.0) as w:  # float mtime: pax headers, as older shards
        for i in range(5):
            buf = io.BytesIO()
            np.save(buf, np.arange(i * 100, dtype=np.uint32))
            w.write({"__key__": f"doc{i:03d}", "tokens.npy": buf.getvalue(), "json": {"i": i}})
    assert _with_tar_reader(path) == _with_tarfile(path)


@pytest.mark.parametrize("cut", ["inside_data", "at_boundary", "inside_header"])
def test_truncated_archives_raise(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "a.tar"
    _archive(path, tarfile.GNU_FORMAT)
    raw = path.read_bytes()
    with tarfile.open(path) as tar:
        last = [m for m in tar if m.isreg() and m.size][-1]
    at = {"inside_data": last.offset_data + 10, "at_boundary": last.offset, "inside_header": last.offset + 100}[cut]
    path.write_bytes(raw[:at])
    with pytest.raises(TarFormatError, match="end"):
        _with_tar_reader(path, read_every=10**6)  # even when the data is only skipped


def test_corrupt_header_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    _archive(path, tarfile.GNU_FORMAT)
    raw = bytearray(path.read_bytes())
    raw[600:604] = b"\xff\x00\xff\x00"  # inside the second header's name field
    path.write_bytes(bytes(raw))
    with pytest.raises(TarFormatError, match="checksum"):
        _with_tar_reader(path)
