"""What every corpus reader shares: options, source specs, work units, path resolution.

A reader splits its input into *units* (a file, a parquet row group, a slice of a JSON list):
picklable descriptions, listed in a deterministic order. The builder hands units to partitions and
calls ``read(unit)`` there, so no partition ever reads another's records.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from moma.pipeline.documents import Record, escape_id, safe_text

JSON_CHUNK = 4096  # records of a JSON list per unit


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class ReaderOptions:
    """How readers turn records into documents (`moma shards build` options, generated from here)."""

    order: str = _opt("image-first", "caption pairs: which segment comes first (random: per document, seeded)",
                      choices=("image-first", "text-first", "random"))
    seed: int = _opt(0, "seed of the per-document random order")
    coco_captions: str = _opt("each", "COCO: a document per caption, or one per image with all its captions",
                              choices=("each", "all"))
    coco_images: str | None = _opt(None, "COCO image folder (default: found beside the JSON)", path=True)
    image_column: str | None = _opt(None, "parquet: the image bytes column (default: first of jpg, image, ...)")
    text_column: str | None = _opt(None, "parquet: the caption column (default: first of caption, txt, text)")
    text_field: str = _opt("text", "JSONL text-only sources: the text field")
    mmc4_images: str | None = _opt(None, "MMC4 image folder (default: beside each JSONL)", path=True)
    units_per_file: int = _opt(0, "text files: 0 = one document per file", cli=False)
    max_record_bytes: int = _opt(64 << 20, "a record larger than this (a text file, .gz member, JSONL line, tar "
                                           "member, caption sidecar, image file or cell) is rejected as too_large "
                                           "without being read whole")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reader:
    """Base class: `kind`, the source `spec` as given, its index among the build's sources.

    Record ids are relative to the source's root (`rel`) as the user sees it: `a/part.txt` and
    `b/part.txt` of one source are two records, also when they are symlinks to files elsewhere (a
    link's id is its own path, never its target's), and an id does not change when other files are
    added. Together with the source's position (documents.document_key) that makes keys unique and
    stable, so what is written does not depend on how the units fall into partitions.

    `path` is made absolute once, here (not resolved: symlinks stay as given): units name absolute
    files, so a relative source and its absolute spelling read the same files, from any working
    directory, and relative image references resolve against a file's real folder."""

    kind = ""

    def __init__(self, path: str, options: ReaderOptions, source_index: int) -> None:
        self.path = os.path.abspath(path)
        self.options = options
        self.source_index = source_index
        self.name = safe_text(f"{self.kind}:{self.path}")
        self.root = source_root(self.path)

    def rel(self, path: str | Path) -> str:
        """A file's id within this source: its path relative to the source root as given (a
        symlink keeps its own path), escaped when the name is not UTF-8 (documents.escape_id)."""
        rel = os.path.relpath(os.path.abspath(path), self.root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):  # not under the root (cannot happen for units)
            rel = Path(path).name
        return escape_id(Path(rel).as_posix())

    def unit_id(self, unit: Any) -> str:
        """A unit's name in a reject (a file, file#row-group, first..last file of a batch)."""
        if isinstance(unit, (str, Path)):
            return self.rel(unit)
        if isinstance(unit, (tuple, list)) and unit and all(isinstance(u, str) for u in unit) and \
                not Path(unit[0]).is_absolute():
            first, last = escape_id(unit[0]), escape_id(unit[-1])
            return first if len(unit) == 1 else f"{first}..{last}"
        if isinstance(unit, tuple) and unit and isinstance(unit[0], str):
            rest = [str(u) for u in unit[1:] if u is not None and u != -1]
            return self.rel(unit[0]) + (f"#{':'.join(rest)}" if rest else "")
        return str(unit)

    def units(self) -> list[Any]:
        raise NotImplementedError

    def read(self, unit: Any) -> Iterator[Record]:
        raise NotImplementedError

    def unit_records(self, unit: Any) -> int | None:
        """How many records `unit` holds, when that is known without reading them (a row group's
        row count, a JSON slice's length): a unit that cannot be read is counted as that many
        rejects, so inputs = written + rejected always. None: unknown (counted as one)."""
        return None


def source_root(spec: str) -> Path:
    """The folder record ids are relative to: the directory given, a file's folder, or a glob's
    longest non-wildcard prefix; absolute, symlinks not resolved (ids are paths as the user sees them)."""
    path = Path(os.path.abspath(spec))
    if path.is_dir():
        return path
    if glob.has_magic(spec):
        parts = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            parts.append(part)
        return Path(*parts)
    return path.parent


class TooLarge(Exception):
    """A record over ReaderOptions.max_record_bytes (read no further than the limit)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes (ReaderOptions.max_record_bytes / --max-record-bytes)")


def read_limited(f: BinaryIO, limit: int) -> bytes:
    """All of `f`, or TooLarge after reading limit + 1 bytes (a gzip bomb is never inflated)."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(limit)
    return data


def read_file_limited(path: Path, limit: int) -> bytes:
    """A small file (a caption sidecar) whole, or TooLarge without reading past the limit."""
    with open(path, "rb") as f:
        return read_limited(f, limit)


def check_size(path: Path, limit: int) -> None:
    """TooLarge for a file (an image the tokenizer will read) over the limit: one stat, no read."""
    if os.stat(path).st_size > limit:
        raise TooLarge(limit)


class BadJson(ValueError):
    """A record that is not JSON a reader can use (invalid, not UTF-8, or nested too deep)."""


def parse_json(raw: bytes | str) -> Any:
    """json.loads of one record, every way it can fail as BadJson: valid JSON nested 50,000 deep
    raises RecursionError, which is no ValueError and took the rest of the file with it."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadJson(f"{type(e).__name__}: {e}" if isinstance(e, RecursionError) else str(e)) from None


def lines_limited(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a file, or (line number, None) for a line over `limit` bytes, whose
    rest is skipped in pieces, never held."""
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield lineno, None
            continue
        yield lineno, line


def expand_paths(spec: str, suffixes: Sequence[str], what: str) -> list[Path]:
    """A file, a directory (recursive, by suffix) or a glob -> sorted absolute files; none is an error."""
    spec = os.path.abspath(spec)
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(tuple(suffixes)))
    elif path.is_file():
        found = [path]
    elif glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    else:
        raise FileNotFoundError(f"{what} source not found: {spec}")
    if not found:
        raise FileNotFoundError(f"{what} source {spec} holds no {'/'.join(suffixes)} files")
    return found


@functools.lru_cache(maxsize=4)
def load_json(path: str, mtime: float) -> Any:
    """Parse a JSON file once per process (units of one big JSON list share it)."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{safe_text(path)}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{safe_text(path)}: JSON nested too deep to parse") from None


def cached_json(path: Path) -> Any:
    return load_json(str(path), os.path.getmtime(path))


def resolve_image_path(ref: str, base: Path) -> Path:
    """Relative image paths resolve against the source file's directory."""
    p = Path(ref)
    return p if p.is_absolute() else base / p


def chunked_units(path: Path, count: int, chunk: int = JSON_CHUNK) -> list[tuple[str, int, int]]:
    return [(str(path), start, min(start + chunk, count)) for start in range(0, count, chunk)]


ReaderFactory = Callable[[str, ReaderOptions, int], Reader]
READERS: dict[str, ReaderFactory] = {}


def register(kind: str) -> Callable[[type[Reader]], type[Reader]]:
    def deco(cls: type[Reader]) -> type[Reader]:
        cls.kind = kind
        READERS[kind] = cls
        return cls
    return deco


def reader_kinds() -> list[str]:
    from moma.pipeline.readers import captions, interleaved, text  # noqa: F401  (they register themselves)

    return sorted(READERS)


def make_reader(spec: str, options: ReaderOptions, source_index: int) -> Reader:
    """`KIND:PATH` -> a reader. Raises ValueError naming the known kinds."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in reader_kinds():
        raise ValueError(f"source {spec!r}: expected KIND:PATH with KIND one of {sorted(READERS)}")
    if not path:
        raise ValueError(f"source {spec!r}: empty path")
    return READERS[kind](path, options, source_index)
