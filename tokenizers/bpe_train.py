"""Train byte-level BPE ranks for tiktoken from a text corpus.

The trainer is rustbpe (MIT; Rust, parallel): its ranks feed ``tiktoken.Encoding`` directly.
``vocab_size`` is the size of the text part of the unified vocabulary: the mergeable ranks plus
the 16 control slots, so ranks = vocab_size - 16 and at least the 256 single bytes.

    moma tokenizer train-text --input 'corpus/*.txt' --vocab-size 8192 --out runs/tok/text
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from moma.tokenizers.progress import progress as progress_bar
from moma.tokenizers.text import TextTokenizer, resolve_pattern
from moma.tokenizers.text_corpus import CorpusStats, iter_corpus, resolve_inputs
from moma.tokenizers.vocab import NUM_RESERVED, SPECIAL_TOKENS

MIN_RANKS = 256


@dataclasses.dataclass
class TrainReport:
    n_ranks: int
    requested_ranks: int
    seconds: float
    stats: CorpusStats

    def summary(self) -> str:
        s = self.stats
        short = "" if self.n_ranks == self.requested_ranks else (
            f" (corpus too small for {self.requested_ranks}: only {self.n_ranks} ranks learnt)")
        return (f"trained {self.n_ranks} ranks{short} on {s.bytes / 1e6:.1f} MB from {s.files} files in "
                f"{self.seconds:.1f}s; invalid UTF-8 sequences replaced: {s.invalid_utf8}; "
                f"bad JSON lines: {s.bad_json_lines}; records without the field: {s.missing_field}")


def ranks_for_vocab_size(vocab_size: int) -> int:
    controls = len(SPECIAL_TOKENS) + NUM_RESERVED
    if vocab_size < MIN_RANKS + controls:
        raise ValueError(f"vocab size {vocab_size} is smaller than {MIN_RANKS} byte tokens + {controls} control "
                         f"tokens = {MIN_RANKS + controls}")
    return vocab_size - controls


def train_bpe(inputs: Sequence[str | os.PathLike[str]], vocab_size: int, out_dir: str | os.PathLike[str],
              field: str = "text", pattern: str | None = None, name: str | None = None,
              progress: bool = True) -> tuple[TextTokenizer, TrainReport]:
    """Train ranks on `inputs` (files, dirs, globs; .txt/.jsonl, optionally .gz) and save them."""
    import rustbpe  # imported here: only training needs it

    n_ranks = ranks_for_vocab_size(vocab_size)
    files = resolve_inputs(inputs)
    total = sum(f.stat().st_size for f in files)
    stats = CorpusStats()
    bar = progress_bar(total=total, unit="B", unit_scale=True, desc="bpe: reading", disable=not progress)

    def texts() -> Iterator[str]:
        seen = 0
        for text in iter_corpus(files, stats, field):
            bar.update(stats.bytes - seen)
            seen = stats.bytes
            yield text

    start = time.perf_counter()
    trainer = rustbpe.Tokenizer()
    kwargs = {"pattern": resolve_pattern(pattern)} if pattern else {}
    trainer.train_from_iterator(texts(), n_ranks, **kwargs)
    bar.close()
    if stats.records == 0:
        raise ValueError(f"no text found in {len(files)} corpus file(s) (field {field!r} for JSONL)")
    ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
    tok = TextTokenizer(ranks, trainer.get_pattern(), name or f"bpe-{vocab_size}", source=str(out_dir))
    report = TrainReport(n_ranks=len(ranks), requested_ranks=n_ranks, seconds=time.perf_counter() - start,
                         stats=stats)
    tok.save(Path(out_dir), extra_meta={"training": {**dataclasses.asdict(stats), "inputs": [str(f) for f in files],
                                                     "vocab_size": vocab_size, "seconds": report.seconds}})
    return tok, report
