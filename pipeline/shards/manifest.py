"""manifest.json: the contract between the shard builder and every consumer.

Holds the format version, the vocabulary layout with both tokenizer identities, and per shard its
name, documents, tokens by modality, bytes and sha256; plus the build's inputs and reject counts
(inputs = written + rejected). Consumers refuse shards whose tokenizers differ from theirs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moma.pipeline.shards.writer import ShardInfo
from moma.tokenizers.fileio import write_json_atomic
from moma.tokenizers.vocab import Vocab, check_identity

MANIFEST = "manifest.json"
SIZES = "sizes.json"
REJECTS = "rejects.jsonl"
FORMAT = "moma-shards/1"


@dataclasses.dataclass
class Manifest:
    vocab: Vocab
    shards: list[ShardInfo]
    build: dict[str, Any]  # sources, reader options, limits, partitions, tokenizer paths (hints)
    totals: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "vocab": self.vocab.to_json(), "shards": [s.to_json() for s in self.shards],
                "build": self.build, "totals": self.totals}

    def save(self, directory: Path) -> None:
        write_json_atomic(directory / SIZES, {s.name: s.docs for s in self.shards})  # OpenCLIP's sizes.json
        write_json_atomic(directory / MANIFEST, self.to_json())  # last: its presence means "complete"

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a finished moma shard directory") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(vocab=Vocab.from_json(data["vocab"], source=str(path)),
                   shards=[ShardInfo.from_json(s) for s in data["shards"]], build=data["build"], totals=data["totals"])

    def check_tokenizers(self, vocab: Vocab, directory: str | Path, consumer: str) -> None:
        """Refuse a consumer whose tokenizers are not the ones the shards were built with."""
        where = str(Path(directory) / MANIFEST)
        check_identity(self.vocab.text, vocab.text, what="text", expected_from=where, found_from=consumer)
        check_identity(self.vocab.image, vocab.image, what="image", expected_from=where, found_from=consumer)
