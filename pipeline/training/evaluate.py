"""Held-out evaluation by modality: a fixed, deterministic set of batches, losses overall / text / image,
under expert choice (as trained) or causal routing (the auxiliary routers).

    moma eval runs/demo/run/export --data runs/demo/shards/captions [--routing causal] [--batches 8]
    moma eval runs/demo/run/checkpoints --data ...        # a checkpoint directory or global_step* dir

The set is the first `batches` batches of a one-stream loader over the held-out shards with a fixed
seed: the same documents, windows and order for every run with the same data, whatever the world
size. During training (`data.eval_sources`, `eval.every`, `eval.batches`) every rank evaluates the
whole set (so expert parallelism sees the same micro-batches everywhere and the figure does not
depend on the layout) and rank 0 writes it to metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moma.pipeline.loader.loader import DataConfig, DataSource, PackedLoader
from moma.tokenizers.vocab import Vocab

EVAL_SEED = 20240731  # the held-out set's own seed: independent of the run's


def heldout_batches(data: DataConfig, sources: tuple[DataSource, ...], vocab: Vocab | None, batch_size: int,
                    batches: int) -> list[dict[str, Any]]:
    """The fixed held-out set: `batches` batches of `batch_size` windows of `data.seq_len` tokens."""
    cfg = dataclasses.replace(data, sources=sources, num_workers=0, strict=False)
    loader = PackedLoader(cfg, batch_size, seed=EVAL_SEED, rank=0, world_size=1, vocab=vocab,
                          consumer="the evaluated model's tokenizers")
    it = iter(loader)
    return [{k: next_batch[k] for k in ("input_ids", "labels")} for next_batch in (next(it) for _ in range(batches))]


Forward = Callable[[torch.Tensor, torch.Tensor, str], Any]  # (input_ids, labels, routing mode) -> ModelOutput


@torch.no_grad()
def evaluate(forward: Forward, batches: list[dict[str, Any]], mode: str = "ec",
             device: torch.device | str = "cpu") -> dict[str, float | int | None]:
    """Token-weighted cross-entropy over the set: all, text targets, image targets."""
    ce = {"text": 0.0, "image": 0.0}
    tokens = {"text": 0, "image": 0}
    for batch in batches:
        out = forward(batch["input_ids"].to(device), batch["labels"].to(device), mode)
        for m in ce:
            ce[m] += float(out.ce_sum[m])
            tokens[m] += int(out.tokens[m])
    n = tokens["text"] + tokens["image"]
    return {"loss": (ce["text"] + ce["image"]) / n if n else None,
            "loss_text": ce["text"] / tokens["text"] if tokens["text"] else None,
            "loss_image": ce["image"] / tokens["image"] if tokens["image"] else None,
            "tokens_text": tokens["text"], "tokens_image": tokens["image"], "batches": len(batches)}


def model_forward(model: torch.nn.Module) -> Forward:
    """A one-process model's forward in a routing mode."""
    def forward(ids: torch.Tensor, labels: torch.Tensor, mode: str) -> Any:
        routing = model.routing(ids, mode=mode) if hasattr(model, "routing") else None
        return model(ids, labels, routing=routing)

    return forward


def load_for_eval(path: str | Path) -> tuple[torch.nn.Module, Vocab]:
    """An export directory, or a checkpoint (directory with `latest`, or a global_step* directory),
    as a one-process model (every expert) and its vocabulary."""
    import json

    from moma.pipeline.model.config import ModelConfig
    from moma.pipeline.model.transformer import Transformer
    from moma.pipeline.training.export import WEIGHTS, _tag_dir, consolidated_state, load_exported

    path = Path(path)
    if (path / WEIGHTS).exists():
        return load_exported(path), Vocab.from_json(json.loads((path / "vocab.json").read_text()),
                                                    source=str(path / "vocab.json"))
    tag_dir = _tag_dir(path)
    state, client = consolidated_state(tag_dir)
    model = Transformer(ModelConfig.from_json(client["model"]), ep_size=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "causal_routers" not in k]:
        raise ValueError(f"{tag_dir}: its weights do not match its model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval(), Vocab.from_json(client["vocab"], source=str(tag_dir))
