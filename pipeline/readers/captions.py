"""Image-caption readers: COCO captions, folders with sidecars, img2dataset tars, parquet/arrow.

Each record becomes one caption pair, [image, text] or [text, image] (ReaderOptions.order).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moma.pipeline.documents import Document, ImageSegment, Record, Reject, caption_pair, clean_caption, escape_id
from moma.pipeline.readers.base import (
    BadJson,
    Reader,
    TooLarge,
    cached_json,
    check_size,
    chunked_units,
    expand_paths,
    parse_json,
    read_file_limited,
    register,
)
from moma.pipeline.shards.tar_reader import TOO_LARGE, TarFormatError, tar_samples
from moma.tokenizers.image_preprocess import IMAGE_SUFFIXES

IMAGE_MEMBER_SUFFIXES = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("jpg", "image", "image_bytes", "img", "png", "webp")
TEXT_COLUMNS = ("caption", "txt", "text", "TEXT")
ID_COLUMNS = ("key", "id", "uid", "image_id")


def _pair(reader: Reader, image: ImageSegment, text: str, record_id: str) -> Document:
    segments = caption_pair(image, text, reader.options.order, reader.options.seed, record_id)
    return Document(source=reader.name, record_id=record_id, segments=segments)


@register("coco")
class CocoReader(Reader):
    """COCO captions JSON (`images[{id, file_name}]`, `annotations[{image_id, caption}]`) + image folder."""

    def _files(self) -> list[Path]:
        return expand_paths(self.path, (".json",), "coco")

    def units(self) -> list[Any]:
        units = []
        for path in self._files():
            data = cached_json(path)
            if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
                raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
            units += chunked_units(path, len(data["images"]), chunk=256)
        return units

    def image_dir(self, json_path: Path) -> Path:
        if self.options.coco_images:
            return Path(os.path.abspath(self.options.coco_images))
        split = json_path.stem.removeprefix("captions_").split("_")[0]  # captions_val2017.json -> val2017
        for candidate in (json_path.parent / "images", json_path.parent.parent / "images",
                          json_path.parent.parent / split, json_path.parent / split):
            if candidate.is_dir():
                return candidate
        return json_path.parent

    def read(self, unit: tuple[str, int, int]) -> Iterator[Record]:
        path, start, end = Path(unit[0]), unit[1], unit[2]
        captions, images_by_id, orphans = _index(str(path), os.path.getmtime(path))
        folder = self.image_dir(path)
        rel = self.rel(path)  # several caption files in one source (train + val) keep their ids apart
        if start == 0:  # annotations of an image id the file does not list: counted once, by the first unit
            for image_id, i in orphans:
                yield Reject(self.name, f"{rel}:{image_id}/{i}", "missing_image_entry",
                             f"annotation of image_id {image_id}, which {path.name} does not list in 'images'")
        for pos in range(start, min(end, len(images_by_id))):
            im = images_by_id[pos]
            caps = captions.get(im["id"], [])
            ids = self._ids(rel, im["id"], caps)
            # An image id listed twice: the first entry (file order; images are sorted stably by id) is
            # the record, a repeat is a duplicate. Decided from the whole file, so the answer is the same
            # whichever unit, and so whichever partition, holds each entry.
            if pos > 0 and images_by_id[pos - 1]["id"] == im["id"]:
                for rid in ids:
                    yield Reject(self.name, rid, "duplicate_id", f"image id {im['id']} listed again in 'images' "
                                                                 f"of {path.name}")
                continue
            try:  # one bad image entry costs its own records, never the rest of the unit
                records = self._image_records(im, caps, ids, folder)
            except Exception as e:  # any failure of one entry is that entry's reject
                records = [Reject(self.name, rid, "bad_record", f"{type(e).__name__}: {e}") for rid in ids]
            yield from records

    def _ids(self, rel: str, image_id: Any, caps: list[Any]) -> list[str]:
        if self.options.coco_captions == "each" and caps:
            return [f"{rel}:{image_id}/{i}" for i in range(len(caps))]
        return [f"{rel}:{image_id}"]

    def _image_records(self, im: dict[str, Any], caps: list[Any], ids: list[str], folder: Path) -> list[Record]:
        file = folder / im["file_name"]
        if not file.is_file():
            return [Reject(self.name, rid, "missing_image", str(file)) for rid in ids]
        if not caps:
            return [Reject(self.name, ids[0], "missing_text", "no caption annotation for this image")]
        try:
            check_size(file, self.options.max_record_bytes)
        except TooLarge as e:
            return [Reject(self.name, rid, "too_large", f"{file}: {e}") for rid in ids]
        image = ImageSegment(str(file), str(file))
        if self.options.coco_captions == "each":
            out: list[Record] = []
            for rid, cap in zip(ids, caps):
                text, why = clean_caption(cap)
                out.append(_pair(self, image, text, rid) if text else Reject(self.name, rid, why))
            return out
        cleaned = [t for t, _ in map(clean_caption, caps) if t]
        return [_pair(self, image, "\n".join(cleaned), ids[0]) if cleaned else Reject(self.name, ids[0], "empty_text")]

    def unit_records(self, unit: tuple[str, int, int]) -> int | None:
        path, start, end = unit
        try:
            captions, images, orphans = _index(path, os.path.getmtime(path))
        except Exception:  # the file itself is what failed: unknown
            return None
        per_image = [len(captions.get(im["id"], [])) if self.options.coco_captions == "each" else 1
                     for im in images[start:end]]
        return sum(max(n, 1) for n in per_image) + (len(orphans) if start == 0 else 0)


@functools.lru_cache(maxsize=4)
def _index(path: str, mtime: float) -> tuple[dict[int, list[str]], list[dict[str, Any]], list[tuple[Any, int]]]:
    """Captions per image id (in annotation id order), the images sorted by id, and the
    annotations whose image id has no image entry ((image id, caption index) each), once per file."""
    data = cached_json(Path(path))
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in sorted(data["annotations"], key=lambda a: a.get("id", 0)):
        captions[ann.get("image_id")].append(ann.get("caption"))
    listed = {im["id"] for im in data["images"]}
    orphans = [(image_id, i) for image_id, caps in captions.items() if image_id not in listed
               for i in range(len(caps))]
    return dict(captions), sorted(data["images"], key=lambda im: im["id"]), orphans


@register("folder")
class FolderReader(Reader):
    """Images with sidecar captions, recursively: x.jpg + x.txt (the caption) and/or x.json
    ("caption" or "text")."""

    def units(self) -> list[Any]:
        root = Path(self.path)
        if not root.is_dir():
            raise FileNotFoundError(f"folder source is not a directory: {root}")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"folder source {root} holds no images")
        return [files[i:i + 512] for i in range(0, len(files), 512)]

    def read(self, unit: list[str]) -> Iterator[Record]:
        root = Path(self.path)
        for rel in unit:
            rid = escape_id(Path(rel).as_posix())  # `rel` stays as the OS gave it: it opens the file
            try:
                yield self._record(root / rel, rid)
            except TooLarge as e:
                yield Reject(self.name, rid, "too_large", str(e))
            except BadJson as e:
                yield Reject(self.name, rid, "bad_json", str(e))
            except OSError as e:  # one unreadable file (permissions, a vanished sidecar) costs its record
                yield Reject(self.name, rid, "unreadable", f"{type(e).__name__}: {e}")

    def _record(self, image: Path, rid: str) -> Record:
        """Every read bounded by max_record_bytes: the sidecar through read_file_limited, the image
        by its size (the tokenizer reads it later)."""
        limit = self.options.max_record_bytes
        txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
        raw: bytes | str | None = None
        if txt.is_file():
            raw = read_file_limited(txt, limit)
        elif meta.is_file():
            try:
                info = parse_json(read_file_limited(meta, limit))
            except BadJson as e:
                raise BadJson(f"{meta.name}: {e}") from None
            raw = info.get("caption", info.get("text")) if isinstance(info, dict) else None
        text, why = clean_caption(raw)
        if text is None:
            return Reject(self.name, rid, why, "no .txt or .json caption" if why == "missing_text" else "")
        check_size(image, limit)
        return _pair(self, ImageSegment(str(image), str(image)), text, rid)

    def unit_records(self, unit: list[str]) -> int | None:
        return len(unit)


@register("img2dataset")
class Img2DatasetReader(Reader):
    """img2dataset's WebDataset output: per key an image (jpg/png/webp), a txt caption and a json."""

    def units(self) -> list[Any]:
        return [str(p) for p in expand_paths(self.path, (".tar",), "img2dataset")]

    def read(self, unit: str) -> Iterator[Record]:
        path = Path(unit)
        try:
            with open(path, "rb") as f:  # the shards' own tar reader: members streamed, one sample at a time
                for key, group in tar_samples(f, max_bytes=self.options.max_record_bytes):
                    rid = f"{self.rel(path)}/{escape_id(key)}"
                    if any(data is TOO_LARGE for data in group.values()):
                        yield Reject(self.name, rid, "too_large", str(TooLarge(self.options.max_record_bytes)))
                        continue
                    try:  # one bad sample costs itself
                        yield self._sample(path, rid, key, {ext.lower(): data or b"" for ext, data in group.items()})
                    except Exception as e:
                        yield Reject(self.name, rid, "bad_record", f"{type(e).__name__}: {e}")
        except (TarFormatError, OSError) as e:
            yield Reject(self.name, f"{self.rel(path)}/<rest>", "truncated_tar", f"{path}: {e}")

    def _sample(self, path: Path, rid: str, key: str, group: dict[str, bytes]) -> Record:
        image = next((group[e] for e in IMAGE_MEMBER_SUFFIXES if e in group), None)
        if image is None:
            return Reject(self.name, rid, "missing_image", f"members: {sorted(group)}")
        raw: bytes | str | None = group.get("txt")
        if raw is None and "json" in group:
            try:
                info = parse_json(group["json"])
            except BadJson as e:
                return Reject(self.name, rid, "bad_json", str(e))
            raw = info.get("caption") if isinstance(info, dict) else None
        text, why = clean_caption(raw)
        if text is None:
            return Reject(self.name, rid, why)
        return _pair(self, ImageSegment(image, f"{path}#{key}"), text, rid)


@register("parquet")
class ParquetReader(Reader):
    """Parquet/Arrow rows with an image-bytes column and a caption column, read one row group at a
    time (the file is never loaded whole). Image cells may be bytes or {'bytes': ..., 'path': ...}."""

    def _columns(self, schema_names: list[str], path: Path) -> tuple[str, str, str | None]:
        def pick(given: str | None, candidates: tuple[str, ...], what: str) -> str:
            if given:
                if given not in schema_names:
                    raise ValueError(f"{path}: no {what} column {given!r} (columns: {schema_names})")
                return given
            found = next((c for c in candidates if c in schema_names), None)
            if found is None:
                raise ValueError(f"{path}: no {what} column among {list(candidates)} (columns: {schema_names}); "
                                 f"name it with --{what}-column")
            return found

        image = pick(self.options.image_column, IMAGE_COLUMNS, "image")
        text = pick(self.options.text_column, TEXT_COLUMNS, "text")
        key = next((c for c in ID_COLUMNS if c in schema_names), None)
        return image, text, key

    def units(self) -> list[Any]:
        import pyarrow.parquet as pq

        units = []
        for path in expand_paths(self.path, (".parquet", ".arrow", ".pq"), "parquet"):
            try:
                pf = pq.ParquetFile(path)
            except (OSError, ValueError):  # an unreadable footer: one unit, rejected (with the reason) when read
                units.append((str(path), -1))
                continue
            self._columns(pf.schema_arrow.names, path)  # fail early on a column mistake
            units += [(str(path), rg) for rg in range(pf.num_row_groups)]
        return units

    def read(self, unit: tuple[str, int]) -> Iterator[Record]:
        import pyarrow.parquet as pq

        path, rg = Path(unit[0]), unit[1]
        pf = pq.ParquetFile(path)
        image_col, text_col, key_col = self._columns(pf.schema_arrow.names, path)
        table = pf.read_row_group(rg, columns=[c for c in (image_col, text_col, key_col) if c])
        images, texts = table.column(image_col).to_pylist(), table.column(text_col).to_pylist()
        keys = table.column(key_col).to_pylist() if key_col else [None] * len(images)
        limit = self.options.max_record_bytes
        for row, (img, raw, key) in enumerate(zip(images, texts, keys)):
            rid = f"{self.rel(path)}#{rg}:{row}" + (f":{key}" if key is not None else "")
            try:  # one bad cell costs its row
                yield self._row(path, rg, row, rid, img, raw, limit, image_col)
            except Exception as e:
                yield Reject(self.name, rid, "bad_record", f"{type(e).__name__}: {e}")

    def _row(self, path: Path, rg: int, row: int, rid: str, img: Any, raw: Any, limit: int, image_col: str) -> Record:
        if isinstance(img, dict):
            img = img.get("bytes")
        if not img:
            return Reject(self.name, rid, "missing_image", f"null or empty {image_col!r}")
        if len(img) > limit or (raw is not None and len(raw) > limit):
            return Reject(self.name, rid, "too_large", str(TooLarge(limit)))
        text, why = clean_caption(raw)
        if text is None:
            return Reject(self.name, rid, why)
        return _pair(self, ImageSegment(bytes(img), f"{path}#{rg}:{row}"), text, rid)

    def unit_records(self, unit: tuple[str, int]) -> int | None:
        import pyarrow.parquet as pq

        if unit[1] < 0:
            return None
        try:
            return pq.ParquetFile(unit[0]).metadata.row_group(unit[1]).num_rows
        except Exception:  # the footer itself is what failed: unknown
            return None
