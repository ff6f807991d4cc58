"""Text-only reader: plain text files (a document each) and JSONL (a document per record's field).

The paper trains on text-only data alongside image-text data; these documents hold one text segment.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moma.pipeline.documents import Document, Record, Reject, TextSegment, clean_caption
from moma.pipeline.readers.base import (
    BadJson,
    Reader,
    TooLarge,
    expand_paths,
    lines_limited,
    parse_json,
    read_limited,
    register,
)
from moma.tokenizers.text_corpus import JSONL_SUFFIXES, TEXT_SUFFIXES, is_jsonl


@register("text")
class TextReader(Reader):
    def units(self) -> list[Any]:
        suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
        return [str(p) for p in expand_paths(self.path, suffixes + tuple(s + ".gz" for s in suffixes), "text")]

    def read(self, unit: str) -> Iterator[Record]:
        path = Path(unit)
        rel, limit = self.rel(path), self.options.max_record_bytes
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                if not is_jsonl(path):
                    yield self._doc(rel, read_limited(f, limit))
                    return
                for lineno, raw in lines_limited(f, limit):
                    rid = f"{rel}:{lineno}"
                    if raw is None:
                        yield Reject(self.name, rid, "too_large", str(TooLarge(limit)))
                        continue
                    if not raw.strip():
                        continue
                    try:
                        record = parse_json(raw)
                    except BadJson as e:
                        yield Reject(self.name, rid, "bad_json", str(e))
                        continue
                    value = record.get(self.options.text_field) if isinstance(record, dict) else None
                    yield self._doc(rid, value.encode("utf-8", "surrogatepass") if isinstance(value, str) else None)
        except TooLarge as e:
            yield Reject(self.name, rel, "too_large", str(e))
        except (OSError, EOFError, zlib.error) as e:
            yield Reject(self.name, rel, "unreadable", str(e))

    def unit_records(self, unit: str) -> int | None:
        return None if is_jsonl(Path(unit)) else 1  # a plain text file is one document

    def _doc(self, rid: str, raw: bytes | None) -> Record:
        text, why = clean_caption(raw)
        if text is None:
            return Reject(self.name, rid, why)
        return Document(source=self.name, record_id=rid, segments=[TextSegment(text)])
