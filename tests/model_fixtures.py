"""Small model configs and mixed text/image batches for the single-process model tests."""

from __future__ import annotations

import torch

from moma.pipeline.model.config import ModelConfig


def small(ffn: str = "moma_4t4i", n_layers: int = 2, **kw: object) -> ModelConfig:
    """A 32-wide model over a 300-id vocabulary whose ids from 200 are image codes."""
    return ModelConfig(vocab_size=300, image_offset=200, d_model=32, n_layers=n_layers, n_heads=2, ffn_hidden=48,
                       ffn=ffn, max_seq_len=64, **kw)


def mixed_ids(b: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    """Text ids with ten image codes at positions 5-14 of every row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (b, t), generator=g)
    ids[:, 5:15] = torch.randint(200, 300, (b, 10), generator=g)
    return ids
