"""Text tokenizer: byte-level BPE on tiktoken, with our control tokens.

Loads ranks from local files only (nothing is downloaded):

* a moma tokenizer directory (``ranks.tiktoken`` + ``tokenizer.json``, written by
  ``moma tokenizer train-text``),
* a standard ``.tiktoken`` ranks file (cl100k_base, o200k_base, r50k/p50k ...); the
  pre-tokenisation pattern of the official files is recognised by their sha256, any other file
  needs ``pattern=`` (a name from ``PATTERNS`` or a regex) or a sidecar ``<file>.json``,
* GPT-2's original release (a directory, or the pair of files, ``encoder.json`` + ``vocab.bpe``).

Control tokens are only ever inserted by the pipeline: ``encode`` treats text such as
``"<|boi|>"`` as ordinary text. Lone surrogates in a Python ``str`` (not valid Unicode scalar
values, so not encodable as UTF-8) are replaced by U+FFFD, as tiktoken does.

    python -c "from moma.tokenizers.text import TextTokenizer as T; t=T.load('out/text'); print(t.encode('hi'))"
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from moma.tokenizers.fileio import atomic_write, sha256_bytes, write_json_atomic
from moma.tokenizers.vocab import NUM_RESERVED, TokenizerIdentity, Vocab, check_identity

# Pre-tokenisation regexes of the public encodings (tiktoken_ext.openai_public).
_R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
           r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
PATTERNS: dict[str, str] = {"gpt2": _R50K, "r50k_base": _R50K, "p50k_base": _R50K, "cl100k_base": _CL100K,
                            "o200k_base": _O200K}

# sha256 of the official ranks files (the hashes tiktoken itself checks downloads against).
OFFICIAL_RANKS: dict[str, str] = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930": "r50k_base",  # == GPT-2's ranks
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069": "p50k_base",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7": "cl100k_base",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d": "o200k_base",
}

RANKS_FILE = "ranks.tiktoken"
META_FILE = "tokenizer.json"


class RanksFileError(ValueError):
    """A ranks file is missing, unreadable or not in the format it claims."""


def serialize_ranks(ranks: dict[bytes, int]) -> bytes:
    """The canonical .tiktoken bytes: ``base64(token) rank`` per line, by rank (what tiktoken writes)."""
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(),
                                                                                      key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


def parse_tiktoken_ranks(data: bytes, source: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64-token rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except Exception as e:  # binascii.Error, ValueError
            raise RanksFileError(f"{source}:{lineno}: not a .tiktoken ranks line ({e}): {line[:60]!r}") from None
        if token in ranks:
            raise RanksFileError(f"{source}:{lineno}: token {token!r} listed twice")
        ranks[token] = rank
    return ranks


def _data_gym_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for raw bytes: printable non-space latin-1 bytes stand for
    themselves; the remaining bytes are mapped, in order, to the code points 256, 257, ..."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in mapping.values()]
    mapping.update({chr(256 + i): b for i, b in enumerate(others)})
    return mapping


def parse_gpt2_ranks(encoder_json: Path, vocab_bpe: Path) -> dict[bytes, int]:
    """GPT-2's release format: byte ranks in alphabet order, then one rank per merge line."""
    alphabet = _data_gym_alphabet()

    def to_bytes(piece: str, where: str) -> bytes:
        try:
            return bytes(alphabet[ch] for ch in piece)
        except KeyError as e:
            raise RanksFileError(f"{where}: character {e.args[0]!r} is not in GPT-2's byte alphabet") from None

    byte_order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    byte_order += [b for b in range(256) if b not in byte_order]
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    merges = _read(vocab_bpe).decode("utf-8").split("\n")
    for lineno, line in enumerate(merges[1:], 2):  # line 1 is a '#version' header
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise RanksFileError(f"{vocab_bpe}:{lineno}: expected two merge halves, got {line!r}")
        merged = to_bytes(parts[0], f"{vocab_bpe}:{lineno}") + to_bytes(parts[1], f"{vocab_bpe}:{lineno}")
        ranks.setdefault(merged, len(ranks))
    try:
        encoder = json.loads(_read(encoder_json))
    except json.JSONDecodeError as e:
        raise RanksFileError(f"{encoder_json}: not valid JSON ({e})") from None
    listed = {to_bytes(k, str(encoder_json)): v for k, v in encoder.items() if k not in ("<|endoftext|>",
                                                                                        "<|startoftext|>")}
    if listed != ranks:
        raise RanksFileError(f"{encoder_json} and {vocab_bpe} disagree: they are not one GPT-2 release")
    return ranks


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RanksFileError(f"ranks file not found: {path}") from None
    except OSError as e:
        raise RanksFileError(f"cannot read ranks file {path}: {e.strerror}") from None


def check_ranks(ranks: dict[bytes, int], source: str) -> None:
    """Byte-level BPE needs all 256 single bytes and contiguous ranks 0..n-1."""
    if not ranks:
        raise RanksFileError(f"{source}: no ranks")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise RanksFileError(f"{source}: not a byte-level BPE: {len(missing)} single bytes have no rank "
                             f"(first: {missing[0]:#04x}); some text could not be encoded")
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        gap = next(i for i, v in enumerate(values) if v != i)
        raise RanksFileError(f"{source}: ranks are not contiguous 0..{len(values) - 1} (first gap at {gap})")


def resolve_pattern(pattern: str) -> str:
    return PATTERNS.get(pattern, pattern)


class TextTokenizer:
    """tiktoken with our control tokens appended after the mergeable ranks."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, name: str, num_reserved: int = NUM_RESERVED,
                 source: str = "<memory>") -> None:
        check_ranks(ranks, source)
        self.pattern = resolve_pattern(pattern)
        self.n_ranks = len(ranks)
        self.source = source
        self.identity = TokenizerIdentity(kind="tiktoken", name=name, sha256=sha256_bytes(serialize_ranks(ranks)),
                                          size=self.n_ranks, extra={"pattern": self.pattern})
        self.vocab = Vocab(text=self.identity, num_reserved=num_reserved)
        self.encoding = tiktoken.Encoding(name=f"moma-{name}", pat_str=self.pattern, mergeable_ranks=ranks,
                                          special_tokens=self.vocab.specials)
        self._ranks = ranks

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], pattern: str | None = None) -> TextTokenizer:
        """Load from a moma tokenizer dir, a .tiktoken file, or GPT-2's encoder.json + vocab.bpe."""
        path = Path(path)
        if path.is_dir():
            if (path / RANKS_FILE).exists():
                return cls._load_tiktoken(path / RANKS_FILE, pattern, meta=path / META_FILE)
            if (path / "encoder.json").exists() or (path / "vocab.bpe").exists():
                return cls._load_gpt2(path / "encoder.json", path / "vocab.bpe", pattern)
            raise RanksFileError(f"{path}: a directory with neither {RANKS_FILE} nor encoder.json + vocab.bpe")
        if path.name == "vocab.bpe" or path.name == "encoder.json":
            return cls._load_gpt2(path.with_name("encoder.json"), path.with_name("vocab.bpe"), pattern)
        return cls._load_tiktoken(path, pattern, meta=path.with_suffix(".json"))

    @classmethod
    def _load_tiktoken(cls, path: Path, pattern: str | None, meta: Path) -> TextTokenizer:
        data = _read(path)
        sha = sha256_bytes(data)
        official = OFFICIAL_RANKS.get(sha)
        default_name = path.parent.name if path.name == RANKS_FILE else path.stem
        name = official or default_name
        if pattern is None and meta.exists():
            info = json.loads(meta.read_text())
            pattern, name = info["pattern"], info.get("name", name)
            if info.get("sha256") and info["sha256"] != sha:
                raise RanksFileError(f"{path}: sha256 {sha[:12]} differs from {info['sha256'][:12]} recorded in "
                                     f"{meta}; the ranks file was changed after training")
        if pattern is None:
            if official is None:
                raise RanksFileError(f"{path}: not an official ranks file and no {meta.name} beside it: pass the "
                                     f"pre-tokenisation pattern (one of {sorted(PATTERNS)} or a regex)")
            pattern = official
        return cls(parse_tiktoken_ranks(data, str(path)), pattern, name, source=str(path))

    @classmethod
    def _load_gpt2(cls, encoder_json: Path, vocab_bpe: Path, pattern: str | None) -> TextTokenizer:
        return cls(parse_gpt2_ranks(encoder_json, vocab_bpe), pattern or "gpt2", "gpt2", source=str(vocab_bpe))

    def check_vocab(self, vocab_path: str | os.PathLike[str]) -> Vocab:
        """Load a vocabulary and make sure its text identity is this tokenizer's (else name both files)."""
        vocab = Vocab.load(vocab_path)
        check_identity(vocab.text, self.identity, what="text", expected_from=str(vocab_path),
                       found_from=self.source)
        return vocab

    def save(self, directory: str | os.PathLike[str], extra_meta: dict | None = None) -> Path:
        """Write ``ranks.tiktoken`` (+ ``.sha256``) and ``tokenizer.json`` into `directory`."""
        directory = Path(directory)
        data = serialize_ranks(self._ranks)
        with atomic_write(directory / RANKS_FILE) as f:
            f.write(data)
        with atomic_write(directory / f"{RANKS_FILE}.sha256", "w") as f:
            f.write(f"{self.identity.sha256}  {RANKS_FILE}\n")
        write_json_atomic(directory / META_FILE, {"name": self.identity.name, "pattern": self.pattern,
                                                  "sha256": self.identity.sha256, "n_ranks": self.n_ranks,
                                                  "vocab": self.vocab.to_json(), **(extra_meta or {})})
        return directory

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids; control-token strings inside `text` are plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text and control ids to a string (controls as their names); image ids are an error."""
        ids = list(ids)
        bad = [i for i in ids if i >= self.vocab.image_offset or i < 0]
        if bad:
            raise ValueError(f"id {bad[0]} is not a text or control token (text vocabulary ends at "
                             f"{self.vocab.image_offset})")
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    @property
    def ranks(self) -> dict[bytes, int]:
        return self._ranks
