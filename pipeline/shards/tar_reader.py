"""The one tar reader: our shards (loader, `shards inspect`) and img2dataset's WebDataset tars.

`tarfile.TarFile.next()` builds a full TarInfo per member (every field decoded, pax and sparse
machinery): on shards of short documents that was most of the loader's time. This reader decodes
only what the loader uses (name, size, type), checks each header's checksum, and reads a member's
data only when asked; everything else is skipped with a seek. It understands what tar writers
put in WebDataset shards: ustar/POSIX headers, pax extended headers (``x``: path and size
override the next member; ``g``: ignored) and GNU long names (``L``). It is tested against
`tarfile` on the same archives (tests/test_tar_reader.py).

    with open(path, "rb") as f:
        for name, size, read in tar_members(f):
            data = read() if name.endswith(".npy") else None  # unread data is skipped
    with open(path, "rb") as f:
        for key, members in tar_samples(f, read={"tokens.npy", "json"}):   # WebDataset samples
            ...
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Callable, Collection, Iterator
from typing import BinaryIO

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


class TarFormatError(ValueError):
    """A header that is not a tar header, or an archive that ends inside a member."""


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes past 8 GiB
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return True
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)  # old writers
    return stored == signed


def _pax_records(body: bytes, offset: int) -> dict[str, str]:
    """POSIX pax records "LEN key=value\n"; a corrupt record is a TarFormatError (a length of 0
    looped forever, a non-numeric one escaped as a plain ValueError)."""
    out, pos = {}, 0
    while pos < len(body) and body[pos:pos + 1] not in (b"\0", b""):
        space = body.find(b" ", pos, pos + 21)
        digits = body[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarFormatError(f"bad pax record length {body[pos:pos + 20]!r} in the extended header at "
                                 f"offset {offset}")
        length = int(digits)
        if length <= space - pos + 1 or pos + length > len(body) or body[pos + length - 1:pos + length] != b"\n":
            raise TarFormatError(f"bad pax record (length {length}) in the extended header at offset {offset}")
        record = body[space + 1:pos + length - 1]  # without the trailing newline
        key, eq, value = record.partition(b"=")
        if not eq:
            raise TarFormatError(f"bad pax record {record[:40]!r} (no '=') in the extended header at offset {offset}")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarFormatError(f"unexpected end of archive in {what} ({len(data)} of {n} bytes)")
    return data


def tar_members(f: BinaryIO) -> Iterator[tuple[str, int, Callable[[], bytes]]]:
    """(name, size, read) for each regular member in order; `read()` returns its data when called
    before advancing, otherwise the data is skipped with a seek. Raises TarFormatError on a corrupt
    header or a truncated archive (one that ends inside a member, or without its end-of-archive
    blocks)."""
    try:
        end_of_file: int | None = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        end_of_file = None  # not a real file: truncation shows when a read comes up short
    override: dict[str, str] = {}
    while True:
        header = f.read(BLOCK)
        if header == b"\0" * BLOCK:
            return  # end-of-archive blocks
        if not header:  # writers always end with zero blocks: a file that stops without them was cut
            raise TarFormatError(f"archive ends at offset {f.tell()} without its end-of-archive blocks (truncated)")
        if len(header) != BLOCK:
            raise TarFormatError(f"unexpected end of archive in a header ({len(header)} of {BLOCK} bytes)")
        if not _checksum_ok(header):
            raise TarFormatError(f"bad header checksum at offset {f.tell() - BLOCK}")
        kind = header[156:157]
        offset = f.tell() - BLOCK
        size = _number(header[124:136])
        if size < 0:
            raise TarFormatError(f"negative member size {size} in the header at offset {offset}")
        if kind in (b"x", b"g", b"L", b"K"):
            if end_of_file is not None and offset + BLOCK + size > end_of_file:
                raise TarFormatError(f"unexpected end of archive in the extended header at offset {offset}")
            body = _read_exact(f, _padded(size), "an extended header")[:size]
            if kind == b"x":
                override.update(_pax_records(body, offset))
            elif kind == b"L":
                override["path"] = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = header[0:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        path = override.pop("path", None) or name.decode("utf-8", "surrogateescape")
        if "size" in override:
            text = override.pop("size")
            if not text.isdigit():
                raise TarFormatError(f"bad pax size {text!r} for the member at offset {offset}")
            size = int(text)
        override.clear()  # pax records apply to the next member only
        start = f.tell()
        if end_of_file is not None and start + size > end_of_file:
            raise TarFormatError(f"unexpected end of archive in member {path} "
                                 f"({end_of_file - start} of {size} bytes)")
        if kind in _REGULAR:
            yield path, size, functools.partial(_read_at, f, start, size, path)  # args[1]: the data's offset
        f.seek(start + _padded(size))


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _read_at(f: BinaryIO, start: int, size: int, name: str) -> bytes:
    f.seek(start)
    return _read_exact(f, size, f"member {name}")


# WebDataset's sample rule: the key is the member path up to the first dot of its base name, the
# extension everything after it ("a/b.tokens.npy" -> key "a/b", extension "tokens.npy").
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name; no extension: (name, "")."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


class Sample(dict):
    """A sample's members, {extension: data}; `offset`: where its first member's data starts."""

    offset: int = 0


class _TooLarge:
    def __repr__(self) -> str:
        return "TOO_LARGE"


TOO_LARGE = _TooLarge()  # in place of the data of a member over `max_bytes` (never read)


def tar_samples(f: BinaryIO, read: Collection[str] | None = None, max_bytes: int | None = None
                ) -> Iterator[tuple[str, Sample]]:
    """WebDataset samples: (key, {extension: data}) for consecutive members that share a key. Only
    the extensions in `read` are read (None: all); the others map to None and are skipped with a
    seek; a member over `max_bytes` maps to TOO_LARGE and is skipped too. Raises TarFormatError like
    `tar_members`, after yielding every sample before the damage (also the last, whose members are
    whole but whose end could not be seen)."""
    key: str | None = None
    group = Sample()
    try:
        for name, size, read_member in tar_members(f):
            k, ext = split_member_name(name)
            if key is not None and k != key:
                yield key, group
                group = Sample()
            if not group:
                group.offset = read_member.args[1]
            key = k
            if max_bytes is not None and size > max_bytes:
                group[ext] = TOO_LARGE
            else:
                group[ext] = read_member() if read is None or ext in read else None
    except TarFormatError:
        if key is not None and group:  # its members are whole: the damage starts after them
            yield key, group
        raise
    if key is not None:
        yield key, group
