"""The unified vocabulary: one id space for BPE text, control tokens and image codes.

Layout (the contract between tokenizers, shards and the model; docs/design.md)::

    [0, V_text)                         BPE mergeable ranks (byte level: any UTF-8 round-trips)
    [V_text, V_text + 16)               <|bos|> <|eos|> <|boi|> <|eoi|> <|pad|> + 11 reserved
    [img_offset, img_offset + K)        image codes of the VQ tokenizer (K = codebook size)

A token's modality is a pure function of its id: image iff it lies in the image-code range.
Control tokens (BOS/EOS/BOI/EOI/pad) count as text. The vocabulary also records *which* text
ranks and *which* image tokenizer produced the ids (their sha256 identities); anything that
stores or consumes tokens compares identities and treats a mismatch as an error.

    python -c "from moma.tokenizers.vocab import Vocab; print(Vocab.load('vocab.json'))"
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moma.tokenizers.fileio import write_json_atomic

SPECIAL_TOKENS: tuple[str, ...] = ("<|bos|>", "<|eos|>", "<|boi|>", "<|eoi|>", "<|pad|>")
NUM_RESERVED = 11  # 5 named + 11 reserved = 16 control slots, room to add tokens without a re-layout
VOCAB_FORMAT = "moma-vocab/1"
IGNORE_INDEX = -100  # a label that is never a target (pad, and whatever follows the last token)

TEXT = 0
IMAGE = 1
MODALITY_NAMES = ("text", "image")

ArrayT = TypeVar("ArrayT")


class IdentityMismatchError(ValueError):
    """Two stages disagree on which tokenizer produced (or will consume) the ids."""


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """What makes two tokenizers interchangeable: the same kind, sha256 of the same weights/ranks,
    and (for text) the same pre-tokenisation pattern."""

    kind: str  # "tiktoken" | "vq" | "fsq"
    name: str  # human-readable: "cl100k_base", "demo-bpe-4096", "vq-tiny"
    sha256: str  # sha256 of the ranks (canonical .tiktoken bytes) or of the image model weights
    size: int  # number of mergeable ranks / codebook size
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # pattern, resolution, ...

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerIdentity:
        return cls(kind=data["kind"], name=data["name"], sha256=data["sha256"], size=int(data["size"]),
                   extra=dict(data.get("extra", {})))

    def short(self) -> str:
        return f"{self.kind}:{self.name}@{self.sha256[:12]}"

    def same_as(self, other: TokenizerIdentity) -> bool:
        # name is a label only; what matters is the bytes and how they are applied
        return (self.kind, self.sha256, self.size, self.extra) == (other.kind, other.sha256, other.size,
                                                                   other.extra)


def check_identity(expected: TokenizerIdentity | None, found: TokenizerIdentity | None, *, what: str,
                   expected_from: str, found_from: str) -> None:
    """Raise IdentityMismatchError naming both sources unless the identities agree."""
    if expected is None and found is None:
        return
    if expected is None or found is None or not expected.same_as(found):
        exp = expected.short() if expected else "none"
        got = found.short() if found else "none"
        raise IdentityMismatchError(
            f"{what} tokenizer mismatch: {expected_from} has {exp} but {found_from} has {got}; "
            f"ids from one are meaningless to the other (rebuild the shards or point to the right tokenizer)")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """The id layout plus the identities of the tokenizers that fill it."""

    text: TokenizerIdentity
    image: TokenizerIdentity | None = None
    num_reserved: int = NUM_RESERVED

    # --- layout -------------------------------------------------------------------------------
    @property
    def text_size(self) -> int:
        return self.text.size

    @property
    def num_specials(self) -> int:
        return len(SPECIAL_TOKENS) + self.num_reserved

    @property
    def special_names(self) -> tuple[str, ...]:
        return SPECIAL_TOKENS + tuple(f"<|reserved_{i}|>" for i in range(self.num_reserved))

    @property
    def specials(self) -> dict[str, int]:
        return {name: self.text_size + i for i, name in enumerate(self.special_names)}

    @property
    def bos_id(self) -> int:
        return self.text_size

    @property
    def eos_id(self) -> int:
        return self.text_size + 1

    @property
    def boi_id(self) -> int:
        return self.text_size + 2

    @property
    def eoi_id(self) -> int:
        return self.text_size + 3

    @property
    def pad_id(self) -> int:
        return self.text_size + 4

    @property
    def image_offset(self) -> int:
        return self.text_size + self.num_specials

    @property
    def image_size(self) -> int:
        return self.image.size if self.image is not None else 0

    @property
    def size(self) -> int:
        return self.image_offset + self.image_size

    def modality(self, ids: ArrayT) -> ArrayT:
        """Vectorised modality of token ids (numpy or torch): 1 for image codes, 0 otherwise."""
        return (ids >= self.image_offset) & (ids < self.size)  # type: ignore[operator]

    def image_codes_to_ids(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.uint32) + np.uint32(self.image_offset)

    def ids_to_image_codes(self, ids: np.ndarray) -> np.ndarray:
        return ids.astype(np.int64) - self.image_offset

    def check_ids(self, ids: np.ndarray) -> None:
        """Raise ValueError if any id lies outside the vocabulary."""
        if ids.size and int(ids.max()) >= self.size:
            raise ValueError(f"token id {int(ids.max())} outside the vocabulary of size {self.size}")

    # --- serialisation ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": VOCAB_FORMAT,
            "text": self.text.to_json(),
            "image": self.image.to_json() if self.image else None,
            "num_reserved": self.num_reserved,
            "layout": {
                "text": [0, self.text_size],
                "specials": {name: idx for name, idx in self.specials.items()},
                "image": [self.image_offset, self.size],
                "size": self.size,
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "<vocab>") -> Vocab:
        if data.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{source}: not a moma vocabulary (format {data.get('format')!r}, "
                             f"expected {VOCAB_FORMAT!r})")
        vocab = cls(text=TokenizerIdentity.from_json(data["text"]),
                    image=TokenizerIdentity.from_json(data["image"]) if data.get("image") else None,
                    num_reserved=int(data.get("num_reserved", NUM_RESERVED)))
        layout = data.get("layout", {})
        if layout and (layout.get("size") != vocab.size or list(layout.get("image", [])) !=
                       [vocab.image_offset, vocab.size]):
            raise ValueError(f"{source}: stored layout {layout.get('image')}/{layout.get('size')} disagrees "
                             f"with the one its identities imply ([{vocab.image_offset}, {vocab.size}])")
        return vocab

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocab:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, source=str(path))

    def describe(self) -> str:
        img = f"[{self.image_offset}, {self.size}) {self.image.short()}" if self.image else "none"
        return (f"vocab size {self.size}: text [0, {self.text_size}) {self.text.short()}; "
                f"specials [{self.text_size}, {self.image_offset}); image {img}")

