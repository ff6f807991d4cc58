"""The VQGAN family autoencoder (taming-transformers architecture and state-dict layout).

    encoder: conv_in -> per level [ResnetBlock x n (+ attention at listed resolutions)] -> Downsample
             -> mid (ResnetBlock, attention, ResnetBlock) -> GroupNorm, swish, conv_out
    quant_conv (1x1) -> quantize -> post_quant_conv (1x1)
    decoder: the mirror image, n + 1 blocks per level, nearest Upsample + conv

Module and parameter names follow taming's ``VQModel`` exactly (``encoder.down.0.block.1.norm1.weight``,
``quantize.embedding.weight`` ...), so Chameleon/Anole ``vqgan.ckpt`` weights load with a strict
key match into the ``chameleon`` preset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moma.tokenizers.quantizers import FSQ, VectorQuantizer


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """Architecture of one image tokenizer; `downsample` = 2 ** (len(ch_mult) - 1)."""

    resolution: int = 64
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 64
    embed_dim: int = 8  # code dimension (VQ); FSQ uses len(fsq_levels)
    quantizer: str = "vq"  # "vq" | "fsq"
    codebook_size: int = 1024  # VQ only; FSQ's is prod(fsq_levels)
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    l2_normalize: bool = True  # VQ: cosine lookup on the unit sphere (keeps codes alive)
    beta: float = 0.25  # commitment weight
    in_channels: int = 3
    dropout: float = 0.0
    # GroupNorm groups (taming: 32 for its 128+ channels). Narrow CPU presets need fewer: one
    # channel per group would normalise away each channel's mean, i.e. the colours.
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        for c in (self.ch * m for m in self.ch_mult):
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not a multiple of norm_groups {self.norm_groups}")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the downsample factor "
                             f"{self.downsample} (ch_mult {self.ch_mult})")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid ** 2

    @property
    def num_codes(self) -> int:
        if self.quantizer == "fsq":
            n = 1
            for level in self.fsq_levels:
                n *= level
            return n
        return self.codebook_size

    @property
    def code_dim(self) -> int:
        return len(self.fsq_levels) if self.quantizer == "fsq" else self.embed_dim

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VQConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown image tokenizer config fields: {sorted(unknown)}")
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 conv projections)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as taming's
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` and `attn` lists plus an optional resampler (taming's names)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None,
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(resample_name, resample)
        self.resample = resample_name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample)(x) if self.resample else x


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, res, c_in = [], cfg.resolution, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout, cfg.norm_groups)
                      for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out, cfg.norm_groups) for _ in blocks] if res in cfg.attn_resolutions else []
            last = i == len(cfg.ch_mult) - 1
            levels.append(_Level(blocks, attns, None if last else Downsample(c_out), "downsample"))
            res, c_in = (res if last else res // 2), c_out
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, cfg.dropout, cfg.norm_groups)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, cfg.dropout, cfg.norm_groups)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):  # lowest resolution first
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout, cfg.norm_groups)
                      for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out, cfg.norm_groups) for _ in blocks] if res in cfg.attn_resolutions else []
            levels.insert(0, _Level(blocks, attns, Upsample(c_out) if i != 0 else None, "upsample"))
            res, c_in = (res * 2 if i != 0 else res), c_out
        self.up = nn.ModuleList(levels)  # indexed like the encoder's levels (taming's order)
        self.norm_out = _norm(c_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Autoencoder with a discrete bottleneck: images [-1, 1] <-> code grids."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize: VectorQuantizer | FSQ
        if cfg.quantizer == "fsq":
            self.quantize = FSQ(cfg.fsq_levels)
        else:
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.beta, cfg.l2_normalize)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, 3, R, R] -> (z_q, quantizer loss, codes [B, R/f, R/f])."""
        return self.quantize(self.encode_latent(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.embed(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction, quantizer loss, codes, pre-quantization latent)."""
        latent = self.encode_latent(x)
        z_q, q_loss, codes = self.quantize(latent)
        return self.decode(z_q), q_loss, codes, latent
