"""A small shard set and run configs for the training tests (real tokenizers, real shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from corpus_fixtures import make_tokenizers

from moma.pipeline.shards.build import BuildConfig, build
from moma.pipeline.synthetic import write_folder_corpus


def make_training_data(d: Path) -> dict[str, Path]:
    text_tok, image_tok = make_tokenizers(d / "tok")
    shapes = write_folder_corpus(d / "shapes", 120, seed=1, size=32)
    books = d / "books"
    books.mkdir()
    for i in range(6):
        (books / f"b{i}.txt").write_text(" ".join(f"a red square {j}" for j in range(40 + 10 * i)))
    out = {"text": text_tok, "image": image_tok}
    for name, source, order in (("captions", f"folder:{shapes}", "random"), ("books", f"text:{books}", "image-first")):
        from moma.pipeline.readers.base import ReaderOptions

        build(BuildConfig(sources=[source], out=str(d / name), text_tokenizer=str(text_tok),
                          image_tokenizer=str(image_tok), options=ReaderOptions(order=order), num_partitions=2,
                          max_docs_per_shard=40), workers=1, progress=False)
        out[name] = d / name
    return out


def run_config(data: dict[str, Path], run_dir: Path, **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir), "seed": 0, "max_steps": 8,
        "data": {"sources": [{"path": str(data["captions"]), "weight": 0.7},
                             {"path": str(data["books"]), "weight": 0.3}],
                 "seq_len": 32, "num_workers": 1, "shuffle_buffer": 16},
        "tokenizers": {"text": str(data["text"]), "image": str(data["image"])},
        "model": {"preset": "tiny", "ffn": "moma_4t4i",
                  "overrides": {"d_model": 64, "n_layers": 2, "n_heads": 2, "ffn_hidden": 96}},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "parallel": {"ds_config": "zero2_fp32", "ep_size": 2, "micro_batch": 2, "grad_accum": 1},
        "checkpoint": {"every": 4, "keep": 3},
    }
    for key, value in top.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
