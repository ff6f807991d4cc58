"""Interleaved readers: LLaVA conversations, OBELICS documents, MMC4 documents.

Images are placed exactly where the source puts them: at LLaVA's `<image>` placeholder, at their
position in OBELICS' aligned `texts`/`images` lists, before the sentence MMC4 matched them to.
Image references are local paths (relative ones resolve against the source file's directory) or
bytes; a URL cannot be fetched here and rejects its document, as does any missing image file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moma.pipeline.documents import Document, ImageSegment, Record, Reject, Segment, TextSegment, escape_id
from moma.pipeline.readers.base import (
    BadJson,
    Reader,
    TooLarge,
    cached_json,
    check_size,
    chunked_units,
    expand_paths,
    lines_limited,
    parse_json,
    register,
    resolve_image_path,
)

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "USER", "user": "USER", "gpt": "ASSISTANT", "assistant": "ASSISTANT", "system": "SYSTEM"}


class _MissingImage(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _image(ref: Any, base: Path, where: str, limit: int) -> ImageSegment:
    """An image reference (bytes, a path relative to `base`, which is absolute) as a segment; an
    image over `limit` bytes is TooLarge (a stat, never a read)."""
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        if len(ref) > limit:
            raise TooLarge(limit)
        return ImageSegment(bytes(ref), where)
    if not isinstance(ref, str) or not ref:
        raise _MissingImage("missing_image", f"{where}: no image reference")
    if ref.startswith(("http://", "https://")):
        raise _MissingImage("remote_image", f"{where}: {ref} is a URL (download images first, e.g. img2dataset)")
    path = resolve_image_path(ref, base)
    if not path.is_file():
        raise _MissingImage("missing_image", str(path))
    check_size(path, limit)
    return ImageSegment(str(path), str(path))


def _finish(reader: Reader, rid: str, segments: list[Segment]) -> Record:
    segments = [s for s in segments if not (isinstance(s, TextSegment) and not s.text.strip())]
    if not segments:
        return Reject(reader.name, rid, "empty_document")
    return Document(source=reader.name, record_id=rid, segments=segments)


def _json_records(path: Path) -> list[Any] | None:
    """A JSON list file's records (cached), or None for JSONL."""
    if path.suffix.lower() == ".json":
        data = cached_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return data
    return None


def _iter_jsonl(reader: Reader, path: Path) -> Iterator[tuple[str, Any] | Reject]:
    rel, limit = reader.rel(path), reader.options.max_record_bytes
    with open(path, "rb") as f:
        for lineno, raw in lines_limited(f, limit):
            rid = f"{rel}:{lineno}"
            if raw is None:
                yield Reject(reader.name, rid, "too_large", str(TooLarge(limit)))
                continue
            if not raw.strip():
                continue
            try:
                yield rid, parse_json(raw)
            except BadJson as e:
                yield Reject(reader.name, rid, "bad_json", str(e))


class _RecordFileReader(Reader):
    """JSON lists (chunked into units) and JSONL files (a unit each)."""

    suffixes: tuple[str, ...] = (".json", ".jsonl")

    def units(self) -> list[Any]:
        units: list[Any] = []
        for path in expand_paths(self.path, self.suffixes, self.kind):
            records = _json_records(path)
            units += chunked_units(path, len(records)) if records is not None else [(str(path), 0, -1)]
        return units

    def records(self, unit: tuple[str, int, int]) -> Iterator[tuple[str, Any] | Reject]:
        path, start, end = Path(unit[0]), unit[1], unit[2]
        records = _json_records(path)
        if records is None:
            yield from _iter_jsonl(self, path)
            return
        for i in range(start, end):
            yield f"{self.rel(path)}:{i}", records[i]

    def read(self, unit: tuple[str, int, int]) -> Iterator[Record]:
        base = Path(unit[0]).parent
        for item in self.records(unit):
            if isinstance(item, Reject):
                yield item
                continue
            rid, record = item
            try:
                yield self.document(rid, record, base)
            except _MissingImage as e:
                yield Reject(self.name, rid, e.reason, str(e))
            except TooLarge as e:
                yield Reject(self.name, rid, "too_large", str(e))
            except Exception as e:  # any failure of one record (RecursionError too) is that record's reject
                yield Reject(self.name, rid, "bad_record", f"{type(e).__name__}: {e}")

    def unit_records(self, unit: tuple[str, int, int]) -> int | None:
        return unit[2] - unit[1] if unit[2] >= 0 else None  # a JSON slice; JSONL: unknown

    def image(self, ref: Any, base: Path, where: str) -> ImageSegment:
        return _image(ref, base, where, self.options.max_record_bytes)

    def document(self, rid: str, record: Any, base: Path) -> Record:
        raise NotImplementedError


@register("llava")
class LlavaReader(_RecordFileReader):
    """LLaVA: {"id", "image", "conversations": [{"from": "human"|"gpt", "value": "...<image>..."}]}.
    Turns become "USER: ..." / "ASSISTANT: ..." lines; the image goes where `<image>` stands (at the
    start if the record has an image but no placeholder)."""

    def document(self, rid: str, record: Any, base: Path) -> Record:
        if record.get("id") is not None:  # position (unique) + the dataset's own id (for people)
            rid = f"{rid}:{escape_id(str(record['id']))}"
        image = self.image(record["image"], base, rid) if record.get("image") else None
        segments: list[Segment] = []
        placed = False
        for turn in record["conversations"]:
            role = ROLES.get(str(turn.get("from", "")).lower(), str(turn.get("from", "")).upper())
            parts = str(turn["value"]).split(IMAGE_PLACEHOLDER)
            segments.append(TextSegment(f"{role}: {parts[0]}"))
            for part in parts[1:]:
                if image is None:
                    raise _MissingImage("missing_image", f"{rid}: {IMAGE_PLACEHOLDER} but no image field")
                segments += [image, TextSegment(part)]
                placed = True
            segments.append(TextSegment("\n"))
        if image is not None and not placed:
            segments.insert(0, image)
        return _finish(self, rid, _merge_texts(segments))


@register("obelics")
class ObelicsReader(_RecordFileReader):
    """OBELICS: aligned `texts` and `images` lists (exactly one of the two set at each position);
    images as paths or bytes. Parquet (a unit per row group) or JSON/JSONL."""

    suffixes = (".json", ".jsonl", ".parquet")

    def units(self) -> list[Any]:
        import pyarrow.parquet as pq

        units: list[Any] = []
        for path in expand_paths(self.path, self.suffixes, "obelics"):
            if path.suffix == ".parquet":
                try:
                    groups = range(pq.ParquetFile(path).num_row_groups)
                except (OSError, ValueError):  # unreadable footer: one unit, rejected when it is read
                    groups = range(-1, 0)
                units += [(str(path), rg, -2) for rg in groups]
            else:
                records = _json_records(path)
                units += chunked_units(path, len(records)) if records is not None else [(str(path), 0, -1)]
        return units

    def unit_records(self, unit: tuple[str, int, int]) -> int | None:
        if unit[2] != -2:
            return super().unit_records(unit)
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(unit[0]).metadata.row_group(unit[1]).num_rows if unit[1] >= 0 else None
        except Exception:  # the footer itself is what failed: unknown
            return None

    def records(self, unit: tuple[str, int, int]) -> Iterator[tuple[str, Any] | Reject]:
        if unit[2] != -2:
            yield from super().records(unit)
            return
        import pyarrow.parquet as pq

        path, rg = Path(unit[0]), unit[1]
        table = pq.ParquetFile(path).read_row_group(rg, columns=["texts", "images"])
        for row, record in enumerate(table.to_pylist()):
            yield f"{self.rel(path)}#{rg}:{row}", record

    def document(self, rid: str, record: Any, base: Path) -> Record:
        texts, images = record["texts"], record["images"]
        if len(texts) != len(images):
            raise ValueError(f"texts ({len(texts)}) and images ({len(images)}) are not aligned")
        segments: list[Segment] = []
        for i, (text, img) in enumerate(zip(texts, images)):
            if img is not None:
                segments.append(self.image(img, base, f"{rid}/images[{i}]"))
            elif text is not None:
                segments.append(TextSegment(str(text)))
        return _finish(self, rid, segments)


@register("mmc4")
class Mmc4Reader(_RecordFileReader):
    """MMC4: `text_list` sentences and `image_info[{image_name, matched_text_index}]`; each image is
    placed before the sentence it was matched to. Images live in ReaderOptions.mmc4_images (default:
    an images/ folder beside the JSONL, or the JSONL's own folder)."""

    suffixes = (".jsonl", ".json")

    def document(self, rid: str, record: Any, base: Path) -> Record:
        if self.options.mmc4_images:
            folder = Path(os.path.abspath(self.options.mmc4_images))
        else:
            folder = base / "images" if (base / "images").is_dir() else base
        sentences = record["text_list"]
        by_sentence: dict[int, list[ImageSegment]] = {}
        for info in record.get("image_info", []):
            idx = int(info["matched_text_index"])
            if not 0 <= idx < len(sentences):
                raise ValueError(f"matched_text_index {idx} outside text_list of {len(sentences)}")
            # folder is absolute (units are): the name resolves once, never against `base` again
            by_sentence.setdefault(idx, []).append(self.image(str(folder / info["image_name"]), base, rid))
        segments: list[Segment] = []
        for i, sentence in enumerate(sentences):
            segments += by_sentence.get(i, [])
            segments.append(TextSegment(str(sentence) + " "))
        return _finish(self, rid, _merge_texts(segments))


def _merge_texts(segments: list[Segment]) -> list[Segment]:
    """Adjacent text segments become one (BPE then sees the whole run of text)."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, TextSegment) and out and isinstance(out[-1], TextSegment):
            out[-1] = TextSegment(out[-1].text + seg.text)
        else:
            out.append(seg)
    return out
