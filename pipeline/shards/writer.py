"""Writing WebDataset tars reproducibly and atomically.

One sample per document: ``{key}.tokens.npy`` (1-D uint32) and ``{key}.json``. Tar headers carry
fixed mtime/owner/mode (so the same documents give byte-identical tars), and every tar is written
under a temporary name and renamed when complete: no reader ever sees half a shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moma.tokenizers.fileio import sha256_file


@dataclasses.dataclass
class ShardInfo:
    name: str
    docs: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    bytes: int = 0
    sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "docs": self.docs, "tokens": {"text": self.text_tokens, "image": self.image_tokens},
                "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(name=d["name"], docs=d["docs"], text_tokens=d["tokens"]["text"], image_tokens=d["tokens"]["image"],
                   bytes=d["bytes"], sha256=d["sha256"])


def encode_sample(key: str, tokens: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens, dtype=np.uint32), allow_pickle=False)
    return {"__key__": key, "tokens.npy": buf.getvalue(),
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8", "backslashreplace")}


class ShardWriter:
    """Rotating tar writer: a new shard after `max_docs` documents or `max_bytes` bytes, and at every
    change of `group` (the builder's unit groups, shards/groups.py: a tar never spans two, so its bytes
    do not depend on which other groups the same writer saw). `groups[i]` is shards[i]'s group."""

    def __init__(self, directory: Path, name_pattern: str, max_docs: int, max_bytes: int) -> None:
        self.directory = directory
        self.name_pattern = name_pattern  # e.g. "shard-{:06d}.tar"
        self.max_docs, self.max_bytes = max_docs, max_bytes
        self.shards: list[ShardInfo] = []
        self.groups: list[int] = []
        self._tar: Any = None  # webdataset.TarWriter (imported when the first shard opens: it imports torch)
        self._file: Any = None
        self._tmp: Path | None = None

    def _open(self, group: int) -> None:
        info = ShardInfo(self.name_pattern.format(len(self.shards)))
        self.shards.append(info)
        self.groups.append(group)
        self._tmp = self.directory / f".{info.name}.tmp"
        import webdataset as wds

        self._file = open(self._tmp, "wb")
        # Fixed header fields: identical input documents give byte-identical tars. mtime is an int:
        # tarfile writes a float mtime as a pax extended header, 1 KiB more per member.
        self._tar = wds.TarWriter(self._file, user="moma", group="moma", mode=0o444, mtime=0)

    def write(self, key: str, tokens: np.ndarray, meta: dict[str, Any], text_tokens: int, image_tokens: int,
              group: int = 0) -> None:
        if self._tar is None or self.groups[-1] != group or self.shards[-1].docs >= self.max_docs or \
                self.shards[-1].bytes >= self.max_bytes:
            self._close_current()
            self._open(group)
        assert self._tar is not None
        size = self._tar.write(encode_sample(key, tokens, meta))
        info = self.shards[-1]
        info.docs += 1
        info.text_tokens += text_tokens
        info.image_tokens += image_tokens
        info.bytes += size + 1024  # payload + its two 512-byte headers: the rotation estimate

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        info = self.shards[-1]
        final = self.directory / info.name
        os.replace(self._tmp, final)
        info.bytes = final.stat().st_size
        info.sha256 = sha256_file(final)
        self._tar = None

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards
