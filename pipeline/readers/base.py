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
from typing import Any

from moma.pipeline.documents import Record

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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Reader:
    """Base class: `kind`, the source `spec` as given, its index among the build's sources."""

    kind = ""

    def __init__(self, path: str, options: ReaderOptions, source_index: int) -> None:
        self.path = path
        self.options = options
        self.source_index = source_index
        self.name = f"{self.kind}:{path}"

    def units(self) -> list[Any]:
        raise NotImplementedError

    def read(self, unit: Any) -> Iterator[Record]:
        raise NotImplementedError


def expand_paths(spec: str, suffixes: Sequence[str], what: str) -> list[Path]:
    """A file, a directory (recursive, by suffix) or a glob -> sorted files; none is an error."""
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
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
