"""Reading documents out of one shard by index.

Tars are read sequentially with a lean member reader (shards/tar_reader.py; skipping to a document
reads only headers). Which documents a stream reads, and in which order, is epoch_plan.py's
business. Bad data is counted (by reason), logged with shard, key and byte offset, and skipped — or
raised in strict mode: a shard missing on disk or empty, a truncated tar, a member that is not a
valid .npy, a token id outside the vocabulary. With `data.verify_shards` a shard is hashed as it
is first opened and a sha256 that differs from manifest.json's stops the run, naming the shard.

A shard is opened in one place, `open_shard` (where another storage, e.g. an object store, plugs in).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moma.pipeline.errors import MomaError
from moma.pipeline.shards.npy import load_npy
from moma.pipeline.shards.tar_reader import Sample, TarFormatError, tar_samples

log = logging.getLogger("moma.loader")


class ShardDataError(MomaError):
    """Bad shard data in strict mode."""


class ShardChecksumError(ShardDataError):
    """A shard whose bytes are not those manifest.json recorded (data.verify_shards)."""


def open_shard(path: Path, sha256: str | None = None) -> BinaryIO:
    """Open one shard for reading. With `sha256`, hash the file first through the same handle
    (what is checked is what is then read) and refuse a mismatch; FileNotFoundError/OSError as open."""
    f = open(path, "rb")
    if sha256:
        try:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        except BaseException:
            f.close()
            raise
        if actual != sha256:
            f.close()
            raise ShardChecksumError(f"{path}: sha256 {actual[:16]}... differs from {sha256[:16]}... recorded in "
                                     f"{path.parent / 'manifest.json'}: the shard was damaged or changed after the "
                                     f"build (`moma shards verify {path.parent}` checks them all)")
        f.seek(0)
    return f


class SegmentReader:
    """Documents of one shard by index: `read(first, count)`, sequential reads continue the open tar.
    `sha256`: verify the shard when it is opened, unless its path is in `verified` (shared by a
    stream's readers: each shard is hashed once per stream process, not at every reopen)."""

    def __init__(self, path: Path, vocab_size: int, bad: Counter, strict: bool, sha256: str | None = None,
                 verified: set[Path] | None = None) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.bad = bad
        self.strict = strict
        self.sha256 = sha256
        self.verified = verified if verified is not None else set()
        self._tar: BinaryIO | None = None
        self._next_doc = 0  # index of the document the tar stream is positioned at
        self._dead = False  # missing/truncated: nothing more comes out of this shard

    def _problem(self, reason: str, key: str, detail: str, offset: int | None = None) -> None:
        where = f" at byte {offset}" if offset is not None else ""
        message = f"{self.path} [{key}]{where}: {reason}: {detail}"
        if self.strict:
            raise ShardDataError(message)
        self.bad[reason] += 1
        log.warning("skipped %s", message)

    def _open(self) -> None:
        try:
            if self.path.stat().st_size == 0:
                self._problem("empty_shard", "-", "zero bytes", 0)
                self._dead = True
                return
            check = self.sha256 if self.path not in self.verified else None
            self._tar = open_shard(self.path, check)
            if check:
                self.verified.add(self.path)
        except FileNotFoundError:
            self._problem("missing_shard", "-", "listed in the manifest but not on disk")
            self._dead = True
        except OSError as e:
            self._problem("truncated_tar", "-", str(e))
            self._dead = True

    def _members(self) -> Iterator[tuple[str, Sample]]:
        """(key, {ext: data}) per document, from the current position; tokens data only is read."""
        assert self._tar is not None
        samples = tar_samples(self._tar, read=("tokens.npy",))
        key = "-"
        while True:
            try:
                item = next(samples, None)
            except (TarFormatError, OSError) as e:
                self._problem("truncated_tar", key, str(e), self._tar.tell())
                self._dead = True
                return
            if item is None:
                return
            key = item[0]
            yield item

    def read(self, first: int, count: int) -> list[tuple[str, np.ndarray] | None]:
        """Documents first .. first+count-1 (None for a skipped one). Reading forward continues the
        open tar; asking for an earlier document reopens it (re-split remainders do that)."""
        if first < self._next_doc and not self._dead:
            self.close()
            self._next_doc = 0
        if self._tar is None and not self._dead:
            self._open()
            self._it = self._members() if self._tar is not None else iter(())
        out: list[tuple[str, np.ndarray] | None] = []
        if self._dead:
            return [None] * count
        while self._next_doc < first:  # skip (headers only)
            if next(self._it, None) is None:
                break
            self._next_doc += 1
        for _ in range(count):
            item = None if self._dead else next(self._it, None)
            if item is None:
                if not self._dead:
                    self._problem("short_shard", "-", f"ends before document {self._next_doc} listed in the manifest",
                                  self._tar.tell() if self._tar is not None else None)
                    self._dead = True
                out.append(None)
                continue
            self._next_doc += 1
            out.append(self._decode(*item))
        return out

    def _decode(self, key: str, group: Sample) -> tuple[str, np.ndarray] | None:
        at = group.offset
        data = group.get("tokens.npy")
        if data is None:
            self._problem("missing_tokens", key, "no tokens.npy member", at)
            return None
        try:
            tokens = load_npy(data)
        except (ValueError, OSError, EOFError) as e:
            self._problem("bad_npy", key, str(e), at)
            return None
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            self._problem("bad_npy", key, f"expected a 1-D integer array, got {tokens.dtype} {tokens.shape}", at)
            return None
        if tokens.size and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            self._problem("token_out_of_range", key, f"id {int(tokens.max())} >= vocabulary size {self.vocab_size}",
                          at)
            return None
        return key, tokens.astype(np.uint32, copy=False)  # ids checked in [0, vocab): 4 bytes each suffice

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
