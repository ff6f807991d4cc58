"""Hugging Face layout of an export: config.json's fields and the remote code that
`transformers.AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)` runs.

    moma export runs/x/checkpoints --out export/        # writes config.json + these two files
    model = AutoModelForCausalLM.from_pretrained("export/", trust_remote_code=True)

The remote code is a thin wrapper: `modeling_moma.py` imports moma's own Transformer (one model, one
routing rule, in pipeline/model/), so `pip install moma[hf]` is what a user of the export needs. It
routes causally (the auxiliary routers; expert choice cannot decide one token at a time) and refuses
an expert-choice export without them, naming the command that fits them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from moma.tokenizers.vocab import Vocab

CODE_FILES = ("configuration_moma.py", "modeling_moma.py")


def hf_config_dict(model: dict[str, Any], vocab: Vocab) -> dict[str, Any]:
    """config.json: what transformers reads, with moma's model config under `moma`."""
    from moma.pipeline.model.config import ModelConfig

    cfg = ModelConfig.from_json(model)
    return {
        "model_type": "moma",
        "architectures": ["MomaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_moma.MomaConfig",
                     "AutoModelForCausalLM": "modeling_moma.MomaForCausalLM"},
        "moma": cfg.to_json(),
        "vocab_size": cfg.vocab_size,  # the logits' width (embedding rows are padded)
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "pad_token_id": vocab.pad_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def write_hf_code(out: Path) -> None:
    """Copy the remote-code files into an export directory (temp + rename)."""
    here = Path(__file__).parent
    for name in CODE_FILES:
        tmp = out / f".{name}.tmp"
        shutil.copyfile(here / name, tmp)
        tmp.replace(out / name)
