"""`moma export`: a self-contained model directory you can take away — every expert under clean names,
both tokenizers inside, the run's held-out settings, and Hugging Face's layout.

    moma export runs/demo/checkpoints --out runs/demo/export [--max-shard-size 5GB]
    model = load_exported("runs/demo/export")          # a single-process Transformer (ep_size 1)

What a directory holds (each file under its final name only when complete):
* `model.safetensors`, or above `--max-shard-size` `model-00001-of-0000N.safetensors` ... with
  `model.safetensors.index.json` (HF's sharded layout: `weight_map`, `metadata.total_size`); tensor
  names without DeepSpeed's containers (`layers.0.ffn.image.experts.0.w1.weight`), mapped both ways
  by training/expert_layout.py; fp32.
* `config.json`: HF-style (`model_type: moma`, `auto_map`, sizes, special token ids) with the model
  config under `moma`; `configuration_moma.py` + `modeling_moma.py` (pipeline/hf/): loadable with
  `transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` when moma is installed.
* `tokenizers/text/` (BPE ranks + pattern) and `tokenizers/image/` (VQ weights + config), referenced
  relatively by `tokenizers.json`: move or copy the directory, delete the originals, it still works.
* `vocab.json`; `export.json`: the checkpoint, step, tokens, parameters and `heldout` (the run's data
  settings and micro-batch, so `moma eval` reads the same held-out set as training did).

DeepSpeed's zero_to_fp32 drops native-MoE experts (and fails for expert parallel > 1). Here the
expert tensors come from DeepSpeed's per-expert files, named by *global* expert index, which is
exactly the parameter name in a model built with expert-parallel size 1; the other tensors from the
model-states file. When the checkpoint has its universal copy, its fp32 master weights are used
instead (exact also for bf16 runs). Works offline, on one process, for any training layout. Every
file is read with torch.load(weights_only=True) (checkpoint.safe_load): nothing is unpickled.
Exports written before this layout (one file, internal names, a flat config.json, absolute tokenizer
paths) still load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
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
from moma.pipeline.training.expert_layout import export_names, internal_names
from moma.tokenizers.fileio import write_json_atomic
from moma.tokenizers.vocab import Vocab

log = logging.getLogger("moma.export")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_MAX_SHARD = "5GB"  # what transformers' save_pretrained uses
FORMAT = 2  # 1: one file of internal names, flat config.json, absolute tokenizer paths


class ExportError(ValueError):
    """A damaged or incomplete export: one line naming the file."""


def parse_size(text: str | int) -> int:
    """'5GB', '200MB', '64KiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected a number with an optional unit, e.g. 5GB, 500MB, 64KiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


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


# --- weights: one file or HF shards -------------------------------------------------------------

def write_weights(out: Path, state: dict[str, torch.Tensor], metadata: dict[str, str],
                  max_shard_bytes: int) -> list[str]:
    """`state` (clean names) as model.safetensors, or as shards + index when larger than
    `max_shard_bytes`; stale weight files of an earlier export in `out` are removed afterwards."""
    from safetensors.torch import save_file

    names = sorted(state)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = [WEIGHTS] if len(groups) == 1 else [SHARD.format(i + 1, len(groups)) for i in range(len(groups))]
    for file, group in zip(files, groups):
        tmp = out / f".{file}.tmp{os.getpid()}"
        save_file({k: state[k].contiguous() for k in group}, str(tmp), metadata={"format": "pt", **metadata})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(out / file)
    if len(files) > 1:
        total = sum(state[k].numel() * state[k].element_size() for k in names)
        write_json_atomic(out / INDEX, {"metadata": {"total_size": total, **metadata},
                                        "weight_map": {k: f for f, g in zip(files, groups) for k in g}})
    for stale in [*out.glob("model*.safetensors"), out / INDEX]:
        if stale.name not in files and stale.exists() and not (stale.name == INDEX and len(files) > 1):
            stale.unlink()
    return files


def weight_files(directory: Path) -> list[Path]:
    """The weight files of an export: the index's shards, or model.safetensors."""
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ExportError(f"{index}: not a safetensors index ({e})") from None
        return [directory / f for f in sorted(set(weight_map.values()))]
    if not (directory / WEIGHTS).exists():
        raise ExportError(f"{directory}: no {WEIGHTS} or {INDEX}: not a `moma export` directory")
    return [directory / WEIGHTS]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export; a missing, truncated or corrupt file is one ExportError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        if not file.exists():
            raise ExportError(f"{file}: missing (listed in {directory / INDEX}); re-export the model")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{file}: not a complete safetensors file ({str(e).splitlines()[0]}); the export is "
                              f"truncated or damaged: re-export it") from None
    return state


def nonfinite_tensors(state: dict[str, torch.Tensor] | torch.nn.Module) -> list[str]:
    """Names of the tensors holding NaN or inf (a model's: as its export stores them)."""
    if isinstance(state, torch.nn.Module):
        names = export_names(state.state_dict())
        state = {names[k]: v for k, v in state.state_dict().items()}
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


# --- reading an export ----------------------------------------------------------------------------

@dataclasses.dataclass
class ExportInfo:
    directory: Path
    model: ModelConfig
    vocab: Vocab
    tokenizers: dict[str, Any]  # paths resolved against the directory
    heldout: dict[str, Any] | None  # the run's held-out settings (evaluate.HeldoutSettings), if recorded
    info: dict[str, Any]


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").exists() and ((path / WEIGHTS).exists() or (path / INDEX).exists())


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e}); the export is damaged: re-export it") from None


def model_config_of(config: dict[str, Any]) -> ModelConfig:
    """The model config inside an export's config.json (HF-style, under `moma`; or flat, format 1)."""
    return ModelConfig.from_json(config["moma"] if "moma" in config else config)


def read_export(directory: str | Path) -> ExportInfo:
    directory = Path(directory)
    if not is_export(directory):
        raise ExportError(f"{directory}: not a `moma export` directory (no config.json with {WEIGHTS} or {INDEX})")
    cfg = model_config_of(_json(directory / "config.json"))
    vocab = Vocab.from_json(_json(directory / "vocab.json"), source=str(directory / "vocab.json"))
    toks = _json(directory / "tokenizers.json") if (directory / "tokenizers.json").exists() else {}
    resolved = {k: (str(directory / v) if k in ("text", "image") and v and not Path(v).is_absolute() else v)
                for k, v in toks.items()}
    info = _json(directory / "export.json") if (directory / "export.json").exists() else {}
    return ExportInfo(directory, cfg, vocab, resolved, info.get("heldout"), info)


def model_dir_config(directory: str | Path) -> dict[str, Any]:
    """The model config (ModelConfig JSON) of a model directory (an export, `moma upcycle`'s output)."""
    config = _json(Path(directory) / "config.json")
    return config["moma"] if "moma" in config else config


@contextlib.contextmanager
def open_weights(directory: str | Path) -> Iterator[Callable[[str], torch.Tensor | None]]:
    """A model directory's tensors by the model's own (global) parameter names, read memory-mapped on
    demand (a rank reads only what it holds): `get(name)` -> the tensor, or None when absent."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    to_internal = internal_names(expected_shapes(ModelConfig.from_json(model_dir_config(directory))))
    where: dict[str, tuple[Path, str]] = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in weight_files(directory):
            try:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise ExportError(f"{file}: not a complete safetensors file ({str(e).splitlines()[0]}); re-export "
                                  f"it") from None
            where.update({to_internal.get(k, k): (file, k) for k in handles[file].keys()})

        def get(name: str) -> torch.Tensor | None:
            if name not in where:
                return None
            file, key = where[name]
            return handles[file].get_tensor(key)

        yield get


def load_exported(directory: str | Path, device: str = "cpu") -> Transformer:
    """An export as a one-process model in eval mode (every expert)."""
    directory = Path(directory)
    cfg = read_export(directory).model
    state = read_weights(directory)
    expected = expected_shapes(cfg)
    if not set(state) <= set(expected):  # clean names (format 2); format 1 stored the internal ones
        to_internal = internal_names(expected)
        state = {to_internal.get(k, k): v for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ExportError(f"{weight_files(directory)[0]}: the weights do not match config.json "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
    bad = [k for k, v in state.items() if v.shape != expected[k]]
    if bad:
        raise ExportError(f"{directory}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, config.json says "
                          f"{tuple(expected[bad[0]])}")
    model = Transformer(cfg, ep_size=1)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# --- writing an export ----------------------------------------------------------------------------

def bundle_tokenizers(out: Path, text: str | None, image: str | None, text_pattern: str | None,
                      vocab: Vocab) -> dict[str, Any]:
    """Copy both tokenizers into out/tokenizers/ (checked against the model's vocabulary); the
    relative references for tokenizers.json."""
    from moma.tokenizers.image_tokenizer import ImageTokenizer
    from moma.tokenizers.text import TextTokenizer

    if not text:
        raise ExportError("the checkpoint records no text tokenizer: give --text-tokenizer")
    for what, path in (("text", text), ("image", image)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"the run's {what} tokenizer {path} is missing: give --{what}-tokenizer PATH "
                                    f"(an export bundles its tokenizers)")
    text_tok = TextTokenizer.load(text, pattern=text_pattern)
    image_tok = ImageTokenizer.load(image) if image and vocab.image is not None else None
    got = Vocab(text=text_tok.identity, image=image_tok.identity if image_tok else None)
    if got.to_json() != vocab.to_json():
        raise ExportError(f"the tokenizers {text}, {image} ({got.describe()}) are not the model's "
                          f"({vocab.describe()})")
    refs: dict[str, Any] = {"text": "tokenizers/text", "image": None, "text_pattern": None}
    text_tok.save(out / "tokenizers" / "text")
    if image_tok is not None:
        image_tok.save(out / "tokenizers" / "image")
        refs["image"] = "tokenizers/image"
    elif (out / "tokenizers" / "image").exists():
        shutil.rmtree(out / "tokenizers" / "image")
    return refs


def hf_config(cfg: ModelConfig, vocab: Vocab) -> dict[str, Any]:
    """config.json: what transformers reads (model_type, auto_map, sizes, special ids), with the
    model config itself under `moma`."""
    from moma.pipeline.hf import hf_config_dict

    return hf_config_dict(cfg.to_json(), vocab)


def write_model_dir(out: Path, state: dict[str, torch.Tensor], client: dict[str, Any], model: dict[str, Any],
                    info: dict[str, Any], max_shard_bytes: int | str = DEFAULT_MAX_SHARD,
                    tokenizers: dict[str, Any] | None = None) -> Path:
    """An export directory from global-named weights (see the module docstring); each file under its
    final name only when complete, config.json last but one and export.json last."""
    from moma.pipeline.hf import write_hf_code
    from moma.pipeline.training.evaluate import HeldoutSettings

    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_json(model)
    vocab = Vocab.from_json(client["vocab"], source=str(info.get("checkpoint")))
    recorded = client.get("config", {}).get("tokenizers", {})
    toks = {**{k: recorded.get(k) for k in ("text", "image", "text_pattern")}, **(tokenizers or {})}
    refs = bundle_tokenizers(out, toks["text"], toks["image"], toks.get("text_pattern"), vocab)
    names = export_names(state)
    files = write_weights(out, {names[k]: v for k, v in state.items()},
                          {"source": str(info.get("checkpoint")), "step": str(client["step"])},
                          parse_size(max_shard_bytes))
    write_json_atomic(out / "vocab.json", client["vocab"])
    write_json_atomic(out / "tokenizers.json", refs)
    write_hf_code(out)
    write_json_atomic(out / "config.json", hf_config(cfg, vocab))
    heldout = HeldoutSettings.from_run_config(client["config"]).to_json() if client.get("config") else None
    write_json_atomic(out / "export.json", {**info, "format": FORMAT, "files": files, "heldout": heldout,
                                            "parameters": sum(v.numel() for v in state.values())})
    return out


def export_checkpoint(ckpt: str | Path, out: str | Path, max_shard_bytes: int | str = DEFAULT_MAX_SHARD,
                      text_tokenizer: str | None = None, image_tokenizer: str | None = None) -> Path:
    tag_dir = _tag_dir(ckpt)
    state, client = consolidated_state(tag_dir)
    expected = expected_shapes(ModelConfig.from_json(client["model"]))
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{tag_dir}: consolidated weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    given = {k: v for k, v in (("text", text_tokenizer), ("image", image_tokenizer)) if v}
    return write_model_dir(Path(out), state, client, client["model"],
                           {"checkpoint": str(tag_dir), "step": client["step"], "tokens": client["tokens"]},
                           max_shard_bytes, given)
