"""Quantizers for the image tokenizer: classic VQ (what Chameleon's weights use) and FSQ.

VectorQuantizer: nearest codebook vector (taming's layout: ``embedding.weight`` [K, D]), codebook
+ commitment loss with straight-through gradients. Two published remedies keep the codebook alive:
l2-normalised codes (cosine lookup, ViT-VQGAN / LlamaGen) and dead-code restarts (Jukebox): codes
unused for a while are re-seeded from current encoder outputs (`restart_dead_codes`, called by the
trainer). Usage is counted in a non-persistent buffer, so the state dict stays taming-compatible.

FSQ (Mentzer et al. 2023, "Finite Scalar Quantization"): each of d channels is bounded and rounded
to L_i levels; the code is the mixed-radix number of the d digits, K = prod(L_i). No codebook to
collapse and no N x K distance matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, l2_normalize: bool = False) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # Steps since each code was last chosen; drives dead-code restarts. Not saved in the
        # model's state dict (the training checkpoint stores it separately).
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long), persistent=False)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code for each row of z [N, D] -> indices [N]."""
        book = self.codebook()
        if self.l2_normalize:
            return (F.normalize(z, dim=-1) @ book.t()).argmax(dim=-1)
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 is the same for every code, so drop it.
        return (book.pow(2).sum(-1) - 2 * z @ book.t()).argmin(dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, H, W] -> (z_q [B, D, H, W] straight-through, loss, indices [B, H, W])."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.l2_normalize:
            flat = F.normalize(flat, dim=-1)
        idx = self.lookup(flat)
        quant = self.codebook()[idx]
        loss = F.mse_loss(quant, flat.detach()) + self.beta * F.mse_loss(flat, quant.detach())
        quant = flat + (quant - flat).detach()
        if self.training:
            with torch.no_grad():
                used = torch.zeros_like(self.steps_unused, dtype=torch.bool)
                used[idx] = True
                self.steps_unused.add_(1).masked_fill_(used, 0)
        z_q = quant.view(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return z_q, loss, idx.view(b, h, w)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """indices [B, H, W] -> z_q [B, D, H, W]."""
        return self.codebook()[idx].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, after_steps: int, generator: torch.Generator | None = None) -> int:
        """Re-seed codes unused for `after_steps` steps with random encoder outputs z [B, D, H, W]."""
        dead = (self.steps_unused >= after_steps).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator, device=flat.device)
        # a little noise so that codes seeded from the same vector can separate
        noise = torch.randn(dead.numel(), self.dim, generator=generator, device=flat.device)
        self.embedding.weight[dead] = flat[pick] + 0.01 * flat.std() * noise
        self.steps_unused[dead] = 0
        return int(dead.numel())


class FSQ(nn.Module):
    def __init__(self, levels: tuple[int, ...]) -> None:
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be >= 2 each, got {levels}")
        self.levels = tuple(levels)
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = torch.cumprod(torch.tensor((1,) + tuple(levels[:-1]), dtype=torch.long), dim=0)
        self.register_buffer("_basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # Map to (-(L-1)/2, (L-1)/2); even L gets a half-step offset so that rounding yields L values.
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = (self._levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        bounded = self._bound(flat)
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
        digits = (rounded.detach() + self._levels // 2).long()  # 0 .. L-1
        idx = (digits * self._basis).sum(-1)
        normalized = rounded / (self._levels // 2)  # roughly [-1, 1]
        z_q = normalized.view(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return z_q, torch.zeros((), device=z.device), idx.view(b, h, w)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        digits = (idx.unsqueeze(-1) // self._basis) % self._levels.long()
        values = (digits - self._levels.long() // 2).float() / (self._levels // 2)
        return values.permute(0, 3, 1, 2).contiguous()
