"""Held-out evaluation by modality: a fixed, deterministic set of batches, losses overall / text / image,
under expert choice (as trained) or causal routing (the auxiliary routers).

    moma eval runs/demo/run/export --data runs/demo/shards/captions [--routing causal]   # the whole set once
    moma eval runs/demo/run/checkpoints --data ... --batches 8   # a checkpoint dir or global_step* dir

The set is what a one-stream loader with its own seed (EVAL_SEED) yields over the held-out shards,
read with the *run's* data settings (seq_len, shuffle buffer, open shards, keep_images_whole) and
micro-batch: the same documents, windows and order for every run with the same data and settings,
whatever the world size. It ends where every document of the first pass has been delivered once
(`batches=None`, `moma eval`'s default): tokens of documents from a second pass that share the last
windows are left out of the loss (labels -100), so no document counts twice, ever (several held-out
sources mix by their token weights: the set ends when every source's first pass is in, and the later
passes of a small source are read and left out). `batches=N` is the
first N batches of that set; asking for more than it holds stops at its end, with a warning (never
cycling silently). During training (`data.eval_sources`, `eval.every`, `eval.batches`) every rank
evaluates the same set (so expert parallelism sees the same micro-batches everywhere and the figure
does not depend on the layout) and rank 0 writes it to metrics.jsonl. `moma eval` of that run's
checkpoint or export, with its defaults and `--batches` = the run's eval.batches, gives the same
figures (tests/test_eval.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader
from moma.tokenizers.vocab import IGNORE_INDEX, Vocab

log = logging.getLogger("moma.eval")
EVAL_SEED = 20240731  # the held-out set's own seed: independent of the run's


@dataclasses.dataclass(frozen=True)
class HeldoutSettings:
    """What defines a run's held-out set besides its shards: the run's data settings (the loader's
    `DataConfig`, sources aside), its micro-batch (expert choice routes over a micro-batch, so the
    batch size changes the figure) and its `eval.batches`. Recorded in every checkpoint (the run
    config) and in every export (export.json, "heldout")."""

    data: DataConfig
    batch_size: int
    eval_batches: int | None = None
    recorded: bool = True  # False: defaults for a model that recorded none (an old export)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self.data, f.name) for f in dataclasses.fields(DataConfig)
                if f.name not in ("sources", "eval_sources")}
        return {"data": data, "batch_size": self.batch_size, "eval_batches": self.eval_batches}

    @classmethod
    def from_json(cls, tree: dict[str, Any]) -> HeldoutSettings:
        return cls(_data_config(tree["data"]), int(tree["batch_size"]), tree.get("eval_batches"))

    @classmethod
    def from_run_config(cls, tree: dict[str, Any]) -> HeldoutSettings:
        """From a run config tree (a checkpoint's `config`)."""
        return cls(_data_config(tree.get("data", {})), int(tree.get("parallel", {}).get("micro_batch", 1)),
                   tree.get("eval", {}).get("batches"))


def _data_config(tree: dict[str, Any]) -> DataConfig:
    """A DataConfig from a recorded data section, sources left out (the held-out shards are given);
    fields this version does not know are ignored, missing ones take their defaults."""
    from moma.pipeline.config_parsing import from_dict

    known = {f.name for f in dataclasses.fields(DataConfig)} - {"sources", "eval_sources"}
    return from_dict(DataConfig, {k: v for k, v in tree.items() if k in known}, where="data")


class _OnePass:
    """Which target tokens of each window belong to the first pass over the held-out documents.

    A document is `<|bos|> ... <|eos|>` (shards contract); the loader tells, per batch row, which
    documents started there and the epoch each belongs to, in order. A row's packer may hold the tail
    of a first-pass document while the stream already hands out second-pass ones: per row, a queue of
    started documents is matched to the <|bos|> tokens as they appear (keep_images_whole may defer a
    start to the next window)."""

    def __init__(self, batch_size: int, vocab: Vocab, sources: int) -> None:
        self.sources = sources
        self.bos, self.eos, self.pad = vocab.bos_id, vocab.eos_id, vocab.pad_id
        self.pending: list[deque[list[Any]]] = [deque() for _ in range(batch_size)]  # [included, windows waited]
        self.current: list[bool] = [False] * batch_size  # whether the document a row is in counts
        self.open: list[bool] = [False] * batch_size  # whether that document goes on past the window
        self.first_epoch: dict[str, int] = {}
        self.passed: dict[str, bool] = {}
        self.latest: dict[str, int] = {}

    def labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's labels with every target token outside the first pass set to IGNORE_INDEX."""
        ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy().copy()
        self.counted = np.zeros((ids.shape[0], ids.shape[1] + 1), dtype=bool)  # window tokens of the first pass
        for key, row, epoch in zip(batch["doc_keys"], batch["doc_rows"], batch["doc_epochs"]):
            source = key.split(":", 1)[0]
            first = self.first_epoch.setdefault(source, epoch)
            self.passed[source] = self.passed.get(source, False) or epoch > first
            self.latest[source] = max(self.latest.get(source, epoch), epoch)
            self.pending[row].append([epoch == first, 0])
        # a source with a small share of the documents may be many passes ahead of the others; once every
        # source is three passes on, the first pass ended long ago: never loop for ever
        if len(self.latest) == self.sources and all(e > self.first_epoch[m] + 2 for m, e in self.latest.items()):
            raise RuntimeError("held-out set: every source is in its fourth pass and rows still hold first-pass "
                               "tokens (a bug in the one-pass bookkeeping)")
        for row in range(ids.shape[0]):
            last = labels[row, -1]
            window = np.append(ids[row], self.pad if last == IGNORE_INDEX else last)
            starts = np.flatnonzero(window == self.bos)
            if len(starts) > len(self.pending[row]):
                raise ValueError("held-out shards: a <|bos|> that starts no document (documents must be "
                                 "<|bos|> ... <|eos|>, as `moma shards build` writes them)")
            flags = [self.current[row]] + [self.pending[row].popleft()[0] for _ in starts]
            counted = (window != self.pad) & np.repeat(flags, np.diff(np.concatenate([[0], starts, [window.size]])))
            labels[row][~counted[1:]] = IGNORE_INDEX  # label i predicts window token i + 1
            self.counted[row] = counted
            self.current[row] = flags[-1]
            real = window[window != self.pad]
            self.open[row] = bool(real.size) and int(real[-1]) != self.eos
            for entry in self.pending[row]:
                entry[1] += 1
                if entry[1] > 2:  # a start is deferred by one window at most (keep_images_whole)
                    raise ValueError("held-out shards: documents that never start with <|bos|> (documents "
                                     "must be <|bos|> ... <|eos|>, as `moma shards build` writes them)")
        return torch.from_numpy(labels)

    @property
    def done(self) -> bool:
        """Every source has moved past its first pass and no row still holds a first-pass token."""
        if len(self.passed) < self.sources or not all(self.passed.values()):
            return False
        return all(not any(e[0] for e in pending) and not (cur and opened)
                   for pending, cur, opened in zip(self.pending, self.current, self.open))


def heldout_batches(data: DataConfig, sources: tuple[DataSource, ...], vocab: Vocab | None, batch_size: int,
                    batches: int | None = None) -> list[dict[str, Any]]:
    """The fixed held-out set: batches of `batch_size` windows of `data.seq_len` tokens covering every
    held-out document once (`batches=None`), or the first `batches` of them (fewer, with a warning,
    when the set ends first: it is never cycled)."""
    if batches is not None and batches < 1:
        raise ValueError(f"held-out batches must be >= 1 (or all), got {batches}")
    if batch_size < 1:
        raise ValueError(f"held-out batch size must be >= 1, got {batch_size}")
    cfg = dataclasses.replace(data, sources=sources, num_workers=0, strict=False)
    loader = PackedLoader(cfg, batch_size, seed=EVAL_SEED, rank=0, world_size=1, vocab=vocab,
                          consumer="the evaluated model's tokenizers")
    one_pass = _OnePass(batch_size, loader.vocab, len(loader.resolved))
    out: list[dict[str, Any]] = []
    for batch in loader:
        out.append({"input_ids": batch["input_ids"], "labels": one_pass.labels(batch)})
        if one_pass.done or len(out) == batches:
            break
    if batches is not None and len(out) < batches:
        log.warning("the held-out set (%s) holds %d batches of %d x %d tokens; evaluating those once, not %d",
                    ", ".join(s.path for s in sources), len(out), batch_size, data.seq_len, batches)
    return out


Forward = Callable[[torch.Tensor, torch.Tensor, str], Any]  # (input_ids, labels, routing mode) -> ModelOutput


@torch.no_grad()
def evaluate(forward: Forward, batches: list[dict[str, Any]], mode: str = "ec",
             device: torch.device | str = "cpu", health: Any = None) -> dict[str, Any]:
    """Token-weighted cross-entropy over the set: all, text targets, image targets. `health`: a
    metrics.RoutingHealthTotals fed after every forward (the forward collecting routing statistics):
    the result then has `routing_health`, per MoE layer and group the share of tokens no expert, one
    and two or more experts took over the whole set."""
    ce = {"text": 0.0, "image": 0.0}
    tokens = {"text": 0, "image": 0}
    for batch in batches:
        out = forward(batch["input_ids"].to(device), batch["labels"].to(device), mode)
        if health is not None:
            health.add()
        for m in ce:
            ce[m] += float(out.ce_sum[m])
            tokens[m] += int(out.tokens[m])
    n = tokens["text"] + tokens["image"]
    result: dict[str, Any] = {
        "loss": (ce["text"] + ce["image"]) / n if n else None,
        "loss_text": ce["text"] / tokens["text"] if tokens["text"] else None,
        "loss_image": ce["image"] / tokens["image"] if tokens["image"] else None,
        "tokens_text": tokens["text"], "tokens_image": tokens["image"], "batches": len(batches)}
    if health is not None and health.shares():
        result["routing_health"] = health.shares()
    return result


def nonfinite_to_null(result: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """JSON has no NaN: non-finite figures become None (null); also returns their names."""
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    return {k: (None if k in bad else v) for k, v in result.items()}, bad


def model_forward(model: torch.nn.Module, collect_stats: bool = False) -> Forward:
    """A one-process model's forward in a routing mode (`collect_stats`: routing statistics too)."""
    def forward(ids: torch.Tensor, labels: torch.Tensor, mode: str) -> Any:
        routing = model.routing(ids, collect_stats=collect_stats, mode=mode) if hasattr(model, "routing") else None
        return model(ids, labels, routing=routing)

    return forward


def load_for_eval(path: str | Path) -> tuple[torch.nn.Module, Vocab, HeldoutSettings]:
    """An export directory, or a checkpoint (directory with `latest`, or a global_step* directory),
    as a one-process model (every expert), its vocabulary and its run's held-out settings."""
    from moma.pipeline.model.config import ModelConfig
    from moma.pipeline.model.transformer import Transformer
    from moma.pipeline.training.export import _tag_dir, consolidated_state, is_export, load_exported, read_export

    path = Path(path)
    if is_export(path):
        info = read_export(path)
        model = load_exported(path)
        settings = HeldoutSettings.from_json(info.heldout) if info.heldout else \
            HeldoutSettings(DataConfig(seq_len=min(model.cfg.max_seq_len, 512)), 4, None, recorded=False)
        return model, info.vocab, settings
    tag_dir = _tag_dir(path)
    state, client = consolidated_state(tag_dir)
    model = Transformer(ModelConfig.from_json(client["model"]), ep_size=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "causal_routers" not in k]:
        raise ValueError(f"{tag_dir}: its weights do not match its model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return (model.eval(), Vocab.from_json(client["vocab"], source=str(tag_dir)),
            HeldoutSettings.from_run_config(client.get("config", {})))


def progress_line(step: int, row: dict[str, Any]) -> str:
    """The log line of one held-out evaluation: expert choice and, when present, causal routing; for an
    auxiliary-router fit (the main model frozen, its expert-choice figure the same every time) the
    causal loss first, with the routers' mean precision / recall against expert choice."""
    def losses(e: dict[str, Any]) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"
        return f"{f(e.get('loss'))} (text {f(e.get('loss_text'))}, image {f(e.get('loss_image'))})"

    routers = row.get("eval_aux_routers")
    if routers and "eval_causal" in row:
        mean = {k: sum(g.get(k, 0.0) for g in routers.values()) / len(routers) for k in ("precision", "recall")}
        return (f"step {step}: held-out loss, causal routing {losses(row['eval_causal'])}; auxiliary routers vs "
                f"expert choice: precision {mean['precision']:.3f}, recall {mean['recall']:.3f} (mean of "
                f"{len(routers)} layer groups); frozen model, expert choice {losses(row['eval'])}")
    line = f"step {step}: held-out loss {losses(row['eval'])}"
    if "eval_causal" in row:
        line += f"; causal routing {losses(row['eval_causal'])}"
    return line
