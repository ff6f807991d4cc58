"""`moma export`: one consolidated safetensors file with every expert, plus model config and vocab.

    moma export runs/demo/checkpoints --out runs/demo/export
    model = load_exported("runs/demo/export")          # a single-process Transformer (ep_size 1)

DeepSpeed's zero_to_fp32 drops native-MoE experts (and fails for expert parallel > 1). Here the
expert tensors come from DeepSpeed's per-expert files, named by *global* expert index, which is
exactly the parameter name in a model built with expert-parallel size 1; the other tensors from the
model-states file. When the checkpoint has its universal copy, its fp32 master weights are used
instead (exact also for bf16 runs). Works offline, on one process, for any training layout. Every
file is read with torch.load(weights_only=True) (checkpoint.safe_load): nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.model.transformer import Transformer
from moma.pipeline.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_model_states,
    read_universal,
    safe_load,
    universal_index,
)
from moma.tokenizers.fileio import write_json_atomic

WEIGHTS = "model.safetensors"


def _tag_dir(ckpt: str | Path, flag: str = "checkpoint") -> Path:
    found = find_checkpoint(str(ckpt), Path(ckpt), flag)
    if found is None:
        raise CheckpointError(f"{ckpt}: no checkpoint")
    return found[0] / found[1]


def consolidated_state(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    main = load_model_states(tag_dir)
    client = main["moma"]
    if universal_index(tag_dir) is not None:
        saved, _ = read_universal(tag_dir)
        return {name: entry["fp32"] for name, entry in saved.items()}, client
    state = {k: v.float() for k, v in main["module"].items()}
    for f in sorted(tag_dir.glob("layer_*_expert_*_model_states.pt")):
        state.update({k: v.float() for k, v in safe_load(f).items()})
    return state, client


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor of the model (ep_size 1, i.e. global names) and its shape, without allocating."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Transformer(cfg, ep_size=1).state_dict().items()}


def write_model_dir(out: Path, state: dict[str, torch.Tensor], client: dict[str, Any], model: dict[str, Any],
                    info: dict[str, Any]) -> Path:
    """An export directory: model.safetensors (global names), config.json, vocab.json, tokenizers.json
    and `info` as export.json; each file under its final name only when complete."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: state[k].contiguous() for k in sorted(state)}, str(tmp),
              metadata={"format": "pt", "source": str(info.get("checkpoint")), "step": str(client["step"])})
    tmp.replace(out / WEIGHTS)
    write_json_atomic(out / "config.json", model)
    write_json_atomic(out / "vocab.json", client["vocab"])
    tokenizers = client.get("config", {}).get("tokenizers", {})
    write_json_atomic(out / "tokenizers.json", {"text": tokenizers.get("text"), "image": tokenizers.get("image"),
                                                "text_pattern": tokenizers.get("text_pattern")})
    write_json_atomic(out / "export.json", {**info, "parameters": sum(v.numel() for v in state.values())})
    return out


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    tag_dir = _tag_dir(ckpt)
    state, client = consolidated_state(tag_dir)
    expected = expected_shapes(ModelConfig.from_json(client["model"]))
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{tag_dir}: consolidated weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    return write_model_dir(Path(out), state, client, client["model"],
                           {"checkpoint": str(tag_dir), "step": client["step"], "tokens": client["tokens"]})


def load_exported(directory: str | Path, device: str = "cpu") -> Transformer:
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = ModelConfig.from_json(json.loads((directory / "config.json").read_text()))
    model = Transformer(cfg, ep_size=1)
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    return model.to(device).eval()
