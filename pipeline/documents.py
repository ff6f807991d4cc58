"""Documents: what every corpus reader normalises its records to (docs/design.md, "Documents").

A document is an ordered list of segments, each text or image. A caption pair is [image, text] or
[text, image]; an interleaved web page or a conversation is any sequence. Readers yield Documents
or Rejects (a record that cannot become a document, with the reason); nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import re

from moma.tokenizers.image_preprocess import ImageSource


@dataclasses.dataclass(frozen=True)
class TextSegment:
    text: str


@dataclasses.dataclass(frozen=True)
class ImageSegment:
    source: ImageSource  # a local path or the encoded bytes
    ref: str  # how to name it in messages: file path, or "<file>#row/column"

    @functools.cached_property  # asked twice per image per build; hashing bytes is not free
    def identity(self) -> str:
        """Same identity -> same pixels: used to encode an image once for all documents that share it."""
        if isinstance(self.source, (bytes, bytearray)):
            return "sha1:" + hashlib.sha1(self.source).hexdigest()
        # abspath, not resolve(): no syscalls; a symlinked duplicate is merely encoded twice
        return "path:" + os.path.abspath(self.source)


Segment = TextSegment | ImageSegment


@dataclasses.dataclass
class Document:
    source: str  # "coco:/data/captions.json"
    record_id: str  # the id in the source: COCO image id + caption index, file name, row number ...
    segments: list[Segment]
    key: str = ""  # filled by the builder: stable, unique, tar-safe

    @property
    def num_images(self) -> int:
        return sum(isinstance(s, ImageSegment) for s in self.segments)


@dataclasses.dataclass(frozen=True)
class Reject:
    source: str
    record_id: str
    reason: str  # short code: missing_image, empty_text, invalid_utf8, corrupt_image, bad_json ...
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        # not dataclasses.asdict: its recursive deep copy dominated builds with many rejects.
        # safe_text: a detail may quote a path that is not UTF-8 (rejects.jsonl must stay UTF-8)
        return {"source": safe_text(self.source), "record_id": safe_text(self.record_id), "reason": self.reason,
                "detail": safe_text(self.detail)}


Record = Document | Reject


def escape_id(text: str) -> str:
    """A file name (or any str from the OS) as a record id that is valid UTF-8 and reversible.

    File names on POSIX are bytes; Python decodes the ones that are not UTF-8 with surrogateescape
    (b"caf\\xe9" -> "caf\\udce9"), which no UTF-8 writer accepts (rejects.jsonl, a key's hash, a
    tar's json). Each such byte becomes the four characters \\xNN and a backslash becomes \\\\, so
    `unescape_id` gives the name back exactly and two names never share an id. A name that is
    UTF-8 and has no backslash (nearly all) is unchanged."""
    if "\\" not in text and not _SURROGATES.search(text):
        return text
    return _SURROGATES.sub(_escape_one, text.replace("\\", "\\\\"))


def _escape_one(m: re.Match[str]) -> str:
    code = ord(m.group())
    # U+DC80..U+DCFF: an undecodable byte (surrogateescape); other lone surrogates come from JSON ("\\ud800")
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _unescape_one(m: re.Match[str]) -> str:
    text = m.group()
    if text == "\\\\":
        return "\\"
    return chr(0xDC00 + int(text[2:], 16)) if text[1] == "x" else chr(int(text[2:], 16))


def unescape_id(text: str) -> str:
    """The inverse of escape_id: the str the OS gave (os.fsencode of it gives the original bytes)."""
    return _ESCAPES.sub(_unescape_one, text)


def safe_text(text: str) -> str:
    """Text for a message or a name: lone surrogates (bytes of a non-UTF-8 file name) as \\udcNN;
    unchanged when there are none. Not reversible: ids use escape_id."""
    return text if not _SURROGATES.search(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


_SURROGATES = re.compile("[\ud800-\udfff]")
_ESCAPES = re.compile(r"\\\\|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def document_key(source_index: int, record_id: str) -> str:
    """Stable, unique, WebDataset-safe key (no dots: WebDataset splits the key at the first one)."""
    slug = _UNSAFE.sub("-", record_id)[-40:].strip("-") or "doc"
    digest = hashlib.sha1(f"{source_index}\0{record_id}".encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"s{source_index:02d}_{slug}_{digest}"


CAPTION_ORDERS = ("image-first", "text-first", "random")


def caption_pair(image: ImageSegment, text: str, order: str, seed: int, record_id: str) -> list[Segment]:
    """[image, text] or [text, image]; "random" is a fair coin seeded by (seed, record id)."""
    if order not in CAPTION_ORDERS:
        raise ValueError(f"order must be one of {CAPTION_ORDERS}, got {order!r}")
    first_image = order == "image-first" or (order == "random" and random.Random(f"{seed}:{record_id}").random() < .5)
    return [image, TextSegment(text)] if first_image else [TextSegment(text), image]


def clean_caption(raw: bytes | str | None) -> tuple[str | None, str]:
    """(caption, "") or (None, reject reason) for a caption that is missing, not UTF-8 or empty."""
    if raw is None:
        return None, "missing_text"
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    text = raw.strip()
    if not text:
        return None, "empty_text"
    return text, ""
