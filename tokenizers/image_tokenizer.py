"""The image tokenizer: presets, weights on disk, batched encode/decode, Chameleon weight import.

    tok = ImageTokenizer.load("runs/vq-tiny")           # train-image --out dir, or a checkpoint file
    codes = tok.encode(batch)                           # uint32 [N, (R/f)^2], raster order
    images = tok.decode(codes)                          # uint8 [N, R, R, 3]

On disk a tokenizer is a directory with ``image_tokenizer.json`` (config + identity) and
``model.safetensors``. Its identity (sha256) is a hash of the config and of every weight tensor,
so the same weights have the same identity wherever they were loaded from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moma.tokenizers.fileio import atomic_write, write_json_atomic
from moma.tokenizers.image_preprocess import from_tensor_batch, to_tensor_batch
from moma.tokenizers.vocab import TokenizerIdentity
from moma.tokenizers.vq_model import VQConfig, VQModel

CONFIG_FILE = "image_tokenizer.json"
WEIGHTS_FILE = "model.safetensors"

PRESETS: dict[str, VQConfig] = {
    # CPU-trainable: 64 px, f = 8 -> 8 x 8 = 64 tokens per image, K = 1024. Narrow at full resolution,
    # wide at 8 x 8 (the cost of a conv grows with pixels x channels^2): ~45 training img/s on 2 cores.
    "tiny": VQConfig(resolution=64, ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1, z_channels=64, embed_dim=8,
                     codebook_size=1024, fsq_levels=(8, 5, 5, 5), norm_groups=4),
    # GPU-scale: 256 px, f = 16 -> 256 tokens, K = 8192 (FSQ: 8*8*8*4*4 = 8192).
    "base": VQConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                     z_channels=256, embed_dim=8, codebook_size=8192, fsq_levels=(8, 8, 8, 4, 4)),
    # Chameleon / Anole's released VQGAN: 512 px, f = 16 -> 1024 tokens, K = 8192, 256-d raw codes.
    "chameleon": VQConfig(resolution=512, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(),
                          z_channels=256, embed_dim=256, codebook_size=8192, l2_normalize=False),
}


def preset_config(name: str, **overrides: Any) -> VQConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown image tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def weights_sha256(cfg: VQConfig, state: dict[str, torch.Tensor]) -> str:
    """Content hash of a tokenizer: its config and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(cfg.to_json(), sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ImageTokenizer:
    """A VQModel in eval mode plus its identity; encode/decode work on whole batches."""

    def __init__(self, model: VQModel, name: str = "vq", source: str = "<memory>",
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.cfg = model.cfg
        self.device = torch.device(device)
        self.source = source
        self.identity = TokenizerIdentity(
            kind=self.cfg.quantizer, name=name, sha256=weights_sha256(self.cfg, model.state_dict()),
            size=self.cfg.num_codes, extra={"resolution": self.cfg.resolution, "downsample": self.cfg.downsample})

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image

    # --- encode / decode ----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 3, R, R] in [-1, 1] -> int64 codes [N, (R/f)^2] (raster order)."""
        _, _, codes = self.model.encode(x.to(self.device))
        return codes.flatten(1)

    def encode(self, images: list[np.ndarray] | np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 [N, R, R, 3] images (or a ready float tensor) -> uint32 codes [N, (R/f)^2]."""
        if isinstance(images, torch.Tensor):
            x = images
        else:
            if len(images) == 0:
                return np.zeros((0, self.tokens_per_image), dtype=np.uint32)
            x = to_tensor_batch(list(images))
        if tuple(x.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(f"expected images of {self.resolution}x{self.resolution}x3, got {tuple(x.shape)}")
        return self.encode_tensor(x).cpu().numpy().astype(np.uint32)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """codes [N, (R/f)^2] (or [(R/f)^2]) -> uint8 images [N, R, R, 3]."""
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        if c.ndim == 1:
            c = c.unsqueeze(0)
        g = self.cfg.grid
        if c.shape[1] != g * g:
            raise ValueError(f"expected {g * g} codes per image, got {c.shape[1]}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.cfg.num_codes):
            raise ValueError(f"codes must lie in [0, {self.cfg.num_codes}), got [{int(c.min())}, {int(c.max())}]")
        x = self.model.decode_codes(c.view(-1, g, g).to(self.device))
        return from_tensor_batch(x)

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tmp = directory / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
        save_file(state, str(tmp))
        os.replace(tmp, directory / WEIGHTS_FILE)
        write_json_atomic(directory / CONFIG_FILE, {"config": self.cfg.to_json(),
                                                    "identity": self.identity.to_json(), **(extra or {})})
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ImageTokenizer:
        """A train-image output dir, a training checkpoint (.pt), or a Chameleon vqgan.ckpt (+ vqgan.yaml)."""
        path = Path(path)
        if path.is_dir():
            if (path / CONFIG_FILE).exists():
                return cls._load_dir(path, device)
            if (path / "vqgan.ckpt").exists():
                return load_chameleon(path / "vqgan.ckpt", path / "vqgan.yaml", device=device)
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (a train-image output) or vqgan.ckpt in it")
        if not path.exists():
            raise FileNotFoundError(f"image tokenizer not found: {path}")
        if path.suffix == ".ckpt":
            return load_chameleon(path, path.with_suffix(".yaml"), device=device)
        return cls._load_training_checkpoint(path, device)

    @classmethod
    def _load_dir(cls, directory: Path, device: str | torch.device) -> ImageTokenizer:
        from safetensors.torch import load_file

        meta = json.loads((directory / CONFIG_FILE).read_text())
        cfg = VQConfig.from_json(meta["config"])
        model = VQModel(cfg)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        tok = cls(model, name=meta["identity"]["name"], source=str(directory), device=device)
        if tok.identity.sha256 != meta["identity"]["sha256"]:
            raise ValueError(f"{directory}: weights hash {tok.identity.sha256[:12]} differs from the recorded "
                             f"{meta['identity']['sha256'][:12]}; {WEIGHTS_FILE} was changed")
        return tok

    @classmethod
    def _load_training_checkpoint(cls, path: Path, device: str | torch.device) -> ImageTokenizer:
        # Our training checkpoints hold only tensors and plain containers: weights_only loading is safe.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise ValueError(f"{path}: not a moma image tokenizer checkpoint (no 'config'/'model')")
        model = VQModel(VQConfig.from_json(ckpt["config"]))
        model.load_state_dict(ckpt["model"], strict=True)
        return cls(model, name=ckpt.get("name", path.stem), source=str(path), device=device)


# --- Chameleon / Anole weights -------------------------------------------------------------------

def chameleon_config_from_yaml(yaml_path: Path) -> VQConfig:
    """Read taming's VQModel yaml (model.params.{embed_dim, n_embed, ddconfig})."""
    import yaml

    try:
        params = yaml.safe_load(yaml_path.read_text())["model"]["params"]
        dd = params["ddconfig"]
        cfg = VQConfig(resolution=int(dd["resolution"]), ch=int(dd["ch"]), ch_mult=tuple(dd["ch_mult"]),
                       num_res_blocks=int(dd["num_res_blocks"]),
                       attn_resolutions=tuple(dd.get("attn_resolutions") or ()), z_channels=int(dd["z_channels"]),
                       embed_dim=int(params["embed_dim"]), codebook_size=int(params["n_embed"]),
                       in_channels=int(dd.get("in_channels", 3)), dropout=float(dd.get("dropout", 0.0)),
                       quantizer="vq", l2_normalize=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{yaml_path}: the VQGAN yaml that describes the checkpoint is missing") from None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{yaml_path}: not a taming VQModel config (missing {e})") from None
    if dd.get("double_z"):
        raise ValueError(f"{yaml_path}: double_z is a KL autoencoder, not a VQGAN")
    return cfg


def load_chameleon(ckpt_path: Path, yaml_path: Path, device: str | torch.device = "cpu",
                   trust_pickle: bool = False) -> ImageTokenizer:
    """Load a taming-layout VQGAN checkpoint with a strict key match (training-loss keys dropped).

    Lightning checkpoints may pickle non-tensor objects; they are refused unless `trust_pickle`
    (only for files whose origin you trust: unpickling can run code).
    """
    cfg = chameleon_config_from_yaml(yaml_path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise ValueError(f"{ckpt_path}: cannot be loaded as plain tensors ({type(e).__name__}: {e}); if you trust "
                         f"the file, load it with trust_pickle=True") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt_path}: no state_dict inside")
    # The taming VQModel also holds its training loss (LPIPS + discriminator) under `loss.`.
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    model = VQModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt_path} does not match the taming VQModel layout of {yaml_path}: "
                         f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}")
    return ImageTokenizer(model, name=ckpt_path.stem, source=str(ckpt_path), device=device)


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        torch.save(payload, f)
