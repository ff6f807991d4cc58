"""The settings of one shard build (light to import: `moma shards build --help` builds its options
from these fields).

    cfg = BuildConfig(sources=["coco:captions.json"], out="shards/", text_tokenizer="tok/text",
                      image_tokenizer="tok/vq")
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from moma.pipeline.readers.base import ReaderOptions
from moma.pipeline.shards import groups
from moma.tokenizers.image_preprocess import DEFAULT_MAX_PIXELS

STAGING = ".staging"
# A build that lost more than half of its inputs is almost always a mistake (a wrong image folder,
# a wrong column, a wrong --text-field): fail loudly, after writing the report (rejects.jsonl).
DEFAULT_MAX_REJECT_FRACTION = 0.5


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class BuildConfig:
    """One shard build; `moma shards build`'s options are generated from these fields (cli_options.py)."""

    sources: list[str]
    out: str = _opt(None, "output directory", required=True)
    text_tokenizer: str = _opt(None, "moma tokenizer dir or .tiktoken file", required=True)
    image_tokenizer: str | None = _opt(None, "required unless every source is text")
    text_pattern: str | None = _opt(None, "pre-tokenisation pattern for a bare .tiktoken file")
    options: ReaderOptions = dataclasses.field(default_factory=ReaderOptions)
    prefix: str = _opt("data", "shard names: PREFIX-000000.tar, ...")
    max_docs_per_shard: int = _opt(10_000, "documents per shard at most")
    max_mb_per_shard: float = _opt(1000.0, "megabytes per shard at most")
    # the output depends on neither --workers nor this: it only spreads whole unit groups (shards/groups.py)
    num_partitions: int = _opt(16, "units of parallel work (a SLURM array task runs one); the output does not "
                                   "depend on it")
    doc_batch: int = _opt(256, "documents tokenized together", cli=False)
    max_reject_fraction: float | None = _opt(DEFAULT_MAX_REJECT_FRACTION,
                                             "fail (exit 2, no manifest; rejects.jsonl and the summary line say why) "
                                             "when more than this fraction of the inputs is rejected; 1 accepts any "
                                             "share")
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, "refuse larger images (decompression bombs)")
    jpeg_draft: bool = _opt(True, "decode JPEGs at a reduced size (>= 2x the tokenizer's; >= 30 dB from a full "
                                  "decode)")

    def __post_init__(self) -> None:
        # Source paths absolute from here on: the recorded settings, the documents' "source" and every
        # worker mean the same files whatever the working directory (a relative spec and its absolute
        # spelling build the same bytes). abspath, not resolve: symlinks stay as the user gave them.
        self.sources = [absolute_source(s) for s in self.sources]
        if self.image_tokenizer is None and any(not s.startswith("text:") for s in self.sources):
            raise ValueError("--image-tokenizer is required: some sources hold images")

    @property
    def max_bytes_per_shard(self) -> int:
        return int(self.max_mb_per_shard * 1e6)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the bytes of the output (recorded in the manifest). Not
        num_partitions: the output does not depend on it (the staging records it, build.py)."""
        return {"sources": self.sources, "options": self.options.to_json(), "prefix": self.prefix,
                "max_docs_per_shard": self.max_docs_per_shard, "max_bytes_per_shard": self.max_bytes_per_shard,
                "groups": groups.policy(), "max_pixels": self.max_pixels, "jpeg_draft": self.jpeg_draft,
                "tokenizer_paths": {"text": self.text_tokenizer, "image": self.image_tokenizer}}

    @property
    def staging(self) -> Path:
        return Path(self.out) / STAGING


def absolute_source(spec: str) -> str:
    """`KIND:PATH` with PATH absolute (not resolved); anything else unchanged (make_reader names the error)."""
    kind, sep, path = spec.partition(":")
    if not sep or not path or not kind.isidentifier():
        return spec
    return f"{kind}:{os.path.abspath(path)}"
