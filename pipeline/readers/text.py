"""Text-only reader: plain text files (a document each) and JSONL (a document per record's field).

The paper trains on text-only data alongside image-text data; these documents hold one text segment.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moma.pipeline.documents import Document, Record, Reject, TextSegment, clean_caption
from moma.pipeline.readers.base import Reader, expand_paths, register
from moma.tokenizers.text_corpus import JSONL_SUFFIXES, TEXT_SUFFIXES, is_jsonl


@register("text")
class TextReader(Reader):
    def units(self) -> list[Any]:
        suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
        return [str(p) for p in expand_paths(self.path, suffixes + tuple(s + ".gz" for s in suffixes), "text")]

    def read(self, unit: str) -> Iterator[Record]:
        path = Path(unit)
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                if not is_jsonl(path):
                    yield self._doc(path.name, f.read())
                    return
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    rid = f"{path.name}:{lineno}"
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        yield Reject(self.name, rid, "bad_json", str(e))
                        continue
                    value = record.get(self.options.text_field) if isinstance(record, dict) else None
                    yield self._doc(rid, value.encode("utf-8", "surrogatepass") if isinstance(value, str) else None)
        except (OSError, EOFError) as e:
            yield Reject(self.name, path.name, "unreadable", str(e))

    def _doc(self, rid: str, raw: bytes | None) -> Record:
        text, why = clean_caption(raw)
        if text is None:
            return Reject(self.name, rid, why)
        return Document(source=self.name, record_id=rid, segments=[TextSegment(text)])
