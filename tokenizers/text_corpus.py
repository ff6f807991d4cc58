"""Reading text corpora: plain text and JSONL files (optionally gzipped), by path, directory or glob.

Bytes that are not valid UTF-8 are decoded with U+FFFD replacement and counted, never a crash;
a JSONL line that is not JSON (or lacks the field) is counted and skipped. Used by BPE training
and by the shard builder's text-only reader.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

_tls = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    _tls.bad = getattr(_tls, "bad", 0) + 1
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd", exc.end


codecs.register_error("moma-count-replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing each invalid sequence with U+FFFD; return (text, replacements)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    _tls.bad = 0
    text = data.decode("utf-8", errors="moma-count-replace")
    return text, _tls.bad


@dataclasses.dataclass
class CorpusStats:
    files: int = 0
    bytes: int = 0
    records: int = 0
    invalid_utf8: int = 0  # invalid byte sequences replaced by U+FFFD
    bad_json_lines: int = 0
    missing_field: int = 0
    first_problems: list[str] = dataclasses.field(default_factory=list)

    def problem(self, where: str) -> None:
        if len(self.first_problems) < 10:
            self.first_problems.append(where)


def strip_compression(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def is_jsonl(path: Path) -> bool:
    return strip_compression(path).endswith(JSONL_SUFFIXES)


def resolve_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, directories (recursively: text and JSONL files) and globs to a sorted file list.

    Every input must match something readable; the error names the first one that does not.
    """
    files: list[Path] = []
    for spec in inputs:
        spec_str = str(spec)
        path = Path(spec_str)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and
                           strip_compression(p).endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"corpus directory {path} holds no text or JSONL files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(spec_str):
            found = sorted(Path(p) for p in glob.glob(spec_str, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"corpus glob {spec_str!r} matches no file")
            files.extend(found)
        else:
            raise FileNotFoundError(f"corpus file not found: {spec_str}")
    for f in files:
        if not os.access(f, os.R_OK):
            raise PermissionError(f"corpus file is not readable: {f}")
    return files


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_file_texts(path: Path, stats: CorpusStats, field: str = "text",
                    block_bytes: int = 1 << 20) -> Iterator[str]:
    """Texts of one file: JSONL records' `field`, or blocks of whole lines of a plain text file."""
    stats.files += 1
    try:
        with _open(path) as f:
            if is_jsonl(path):
                yield from _iter_jsonl(f, path, field, stats)
            else:
                yield from _iter_blocks(f, stats, block_bytes)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise OSError(f"cannot read corpus file {path}: {e}") from e


def _iter_blocks(f: IO[bytes], stats: CorpusStats, block_bytes: int) -> Iterator[str]:
    # Blocks end at a newline: b"\n" never occurs inside a multi-byte UTF-8 sequence,
    # so no character is ever split between two blocks.
    while block := f.read(block_bytes):
        if not block.endswith(b"\n"):
            block += f.readline()
        stats.bytes += len(block)
        stats.records += 1
        text, bad = decode_utf8(block)
        stats.invalid_utf8 += bad
        yield text


def _iter_jsonl(f: IO[bytes], path: Path, field: str, stats: CorpusStats) -> Iterator[str]:
    for lineno, raw in enumerate(f, 1):
        stats.bytes += len(raw)
        if not raw.strip():
            continue
        line, bad = decode_utf8(raw)
        stats.invalid_utf8 += bad
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            stats.bad_json_lines += 1
            stats.problem(f"{path}:{lineno}: not JSON ({e.msg})")
            continue
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            stats.missing_field += 1
            stats.problem(f"{path}:{lineno}: no string field {field!r}")
            continue
        stats.records += 1
        yield value


def iter_corpus(files: Sequence[Path], stats: CorpusStats, field: str = "text") -> Iterator[str]:
    for path in files:
        yield from iter_file_texts(path, stats, field)
