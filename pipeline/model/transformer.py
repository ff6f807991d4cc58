"""Chameleon-style early-fusion decoder over one token stream of text BPE and image VQ codes.

Blocks: pre-norm, x + Attention(RMSNorm(x)) then h + FFN(RMSNorm(h), modality), or (`block_norm:
swin`, Chameleon-7B's and the MoMa paper's) x + RMSNorm(Attention(x)) then h + RMSNorm(FFN(h)). Attention is shared
by both modalities (RoPE, QK-norm, causal SDPA); only the FFN differs between the variants
(ffn.py). A token's modality is a function of its id (id >= image_offset), so the batch carries
nothing else. The model knows no process groups and no expert placement: `ep_size` only sets how
many experts each rank holds; DeepSpeed's groups are wired in training/engine.py and global expert
names live in training/expert_layout.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.model.ffn import GroupedMoEFFN, build_ffn
from moma.pipeline.model.routing import AuxRouter, RoutingInfo, aux_router_stats, routing_info, routing_subset
from moma.tokenizers.vocab import IGNORE_INDEX


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, L, D] at positions start .. start + L - 1 (or at `positions` [B, L]: a MoD layer's kept
    tokens): rotate consecutive pairs (x0, x1) of each head by position-dependent angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    if positions is not None:
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [B, 1, L, D/2]
    else:
        cos, sin = cos[start: start + x.shape[2]], sin[start: start + x.shape[2]]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # QK-norm (Chameleon): normalising queries and keys per head keeps logits bounded when
        # the two modalities' activations differ in scale.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, positions: torch.Tensor | None = None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        """`keys` [b, t] bool (causal MoD): only those positions serve as keys (and each query itself)."""
        b, t, d = x.shape
        start = cache.length if cache is not None else 0
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q = apply_rope(self.q_norm(q), cos, sin, start, positions)
        k = apply_rope(self.k_norm(k), cos, sin, start, positions)
        if cache is not None:
            k, v = cache.append(k, v)
            if keys is not None:
                keys = cache.append_keys(keys)
        if start == 0 and keys is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new tokens after cached ones: each sees the cached keys and the new ones up to itself
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
            if keys is not None:
                itself = torch.zeros_like(mask)
                itself[torch.arange(t), torch.arange(start, start + t)] = True
                mask = (mask & keys[:, None, :]) | itself  # [b, t, T]
                mask = mask.unsqueeze(1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class LayerCache:
    """One attention layer's keys and values so far (generation)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None  # causal MoD: the cached positions kept at this layer

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def append_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Causal MoD: which cached positions were kept at this layer (they alone serve as keys)."""
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=1)
        return self.keys


class KVCache:
    """Every layer's keys and values: `model(ids, cache=cache)` runs only the new positions."""

    def __init__(self, layers: int) -> None:
        self.layers = [LayerCache() for _ in range(layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class Block(nn.Module):
    """Attention + FFN, pre-norm or Swin-style post-norm (`cfg.block_norm`). A mixture-of-depths
    layer (MoD, "_mod" variants, alternating layers from 0) runs the block on the top mod_capacity of
    each sequence's tokens by a router over all its tokens (before the modality split); the others
    skip it on the residual stream, and a kept token's block output is scaled by its router weight
    sigmoid(logit), which trains the router."""

    def __init__(self, cfg: ModelConfig, ep_size: int, index: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg, ep_size)
        self.swin = cfg.block_norm == "swin"
        self.mod_router = nn.Linear(cfg.d_model, 1, bias=False) if cfg.is_mod_layer(index) else None
        self.mod_capacity = cfg.mod_capacity
        self.last_kept: torch.Tensor | None = None  # MoD: the positions kept in the last forward
        # MoD's auxiliary router (causal inference): a token is kept iff its score > 0.5; named so that
        # it trains with the MoE layers' auxiliary routers ("causal_routers")
        self.causal_routers = nn.ModuleDict({"mod": AuxRouter(cfg.d_model, 1)}) \
            if self.mod_router is not None and cfg.aux_routers else None
        self.aux_router_loss = torch.zeros(())
        self.aux_router_stats: dict[str, dict[str, torch.Tensor]] = {}

    def _block(self, x: torch.Tensor, is_image: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               routing: RoutingInfo | None, cache: LayerCache | None, positions: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> torch.Tensor:
        if self.swin:  # the norms on the outputs: raw gates and two-expert sums never reach the residual
            h = x + self.attention_norm(self.attention(x, cos, sin, cache, positions, keys))
            return h + self.ffn_norm(self.ffn(h, is_image, routing))
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, positions, keys)
        return h + self.ffn(self.ffn_norm(h), is_image, routing)

    def _causal_mod(self, x: torch.Tensor, is_image: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    routing: RoutingInfo, cache: LayerCache | None) -> torch.Tensor:
        """Causal MoD: each token is kept iff its auxiliary score > 0.5 (decided by the token alone);
        a kept token attends to the kept tokens up to itself. The block runs on every token and only
        the kept ones take its output (each token's FFN routing is its own in causal mode)."""
        if self.causal_routers is None:
            raise ValueError("mixture-of-depths picks each sequence's top tokens, which is not causal: causal "
                             "routing needs its auxiliary routers (moma train-aux-routers)")
        kept = self.causal_routers["mod"](x).squeeze(-1) > 0  # [b, t]
        ys = self._block(x, is_image, cos, sin, routing, cache, keys=kept)
        weight = torch.sigmoid(self.mod_router(x).float()).to(x.dtype)
        return torch.where(kept.unsqueeze(-1), x + weight * (ys - x), x)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                routing: RoutingInfo | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        if self.mod_router is None:
            return self._block(x, is_image, cos, sin, routing, cache)
        if routing is not None and routing.mode == "causal":
            return self._causal_mod(x, is_image, cos, sin, routing, cache)
        if cache is not None:
            raise ValueError("mixture-of-depths picks each sequence's top tokens, which is not causal: "
                             "one-token decoding needs causal routing (its auxiliary routers)")
        b, t, d = x.shape
        k = max(1, math.ceil(self.mod_capacity * t))
        logits = self.mod_router(x).squeeze(-1).float()  # [b, t]
        keep = logits.topk(k, dim=1).indices.sort(dim=1).values  # each row's kept positions, in order
        self.last_kept = keep
        index = keep.unsqueeze(-1).expand(b, k, d)
        xs = x.gather(1, index)
        sub = routing
        if routing is not None:
            flat = (keep + torch.arange(b, device=x.device).unsqueeze(1) * t).reshape(-1)
            sub = routing_subset(routing, flat, b * t, getattr(self.ffn, "exchange", None))
        ys = self._block(xs, is_image.gather(1, keep), cos, sin, sub, None, positions=keep)
        weight = torch.sigmoid(logits.gather(1, keep)).unsqueeze(-1).to(x.dtype)
        if routing is not None and routing.aux_targets and self.causal_routers is not None:
            target = torch.zeros(b, t, device=x.device).scatter(1, keep, 1.0)
            aux_logits = self.causal_routers["mod"](x.detach()).squeeze(-1)
            self.aux_router_loss = F.binary_cross_entropy_with_logits(aux_logits, target)
            if routing.collect_stats:
                self.aux_router_stats = {"mod": aux_router_stats(aux_logits, target)}
        return x.scatter(1, index, xs + weight * (ys - xs))


@dataclasses.dataclass
class ModelOutput:
    loss: torch.Tensor  # what backward() sees: mean CE + z-loss + router aux loss
    ce_sum: dict[str, torch.Tensor]  # summed CE by target modality ("text", "image"), detached
    tokens: dict[str, torch.Tensor]  # counted targets by modality
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor | None = None
    aux_router_loss: torch.Tensor | None = None  # BCE of the auxiliary routers (routing.aux_targets)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.ep_size = ep_size
        self.tok_embeddings = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, ep_size, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def routing(self, input_ids: torch.Tensor, collect_stats: bool = False, mode: str = "ec",
                aux_targets: bool = False) -> RoutingInfo | None:
        """The micro-batch's routing metadata for every MoE layer (None without MoE layers).
        mode "causal": each token routed on its own by the auxiliary routers (inference)."""
        spec = self.cfg.ffn_spec
        if not spec.learned_routing and not spec.mod:
            return None
        groups = [g for g, _ in spec.groups] if spec.learned_routing else []
        return routing_info(input_ids, self.cfg.image_offset, self.cfg.pad_id, groups, collect_stats, mode,
                            aux_targets)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                return_logits: bool = False, routing: RoutingInfo | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        """`cache`: the keys and values of earlier positions (generation); `input_ids` are the new ones."""
        start = cache.length if cache is not None else 0
        if start + input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + input_ids.shape[1]} > max_seq_len {self.cfg.max_seq_len}")
        if routing is None:
            routing = self.routing(input_ids)
        ec = routing is not None and routing.mode == "ec" and self.cfg.router == "expert_choice"
        if input_ids.shape[1] == 1 and ec:
            # expert choice ranks tokens against each other across the batch: over one token per
            # sequence every expert takes every token (a check found gates summing to 2.47)
            raise ValueError("expert-choice routing is not causal: it cannot run one token at a time "
                             "(autoregressive decoding needs causal routing with auxiliary routers)")
        is_image = input_ids >= self.cfg.image_offset
        h = self.tok_embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, is_image, self.rope_cos, self.rope_sin, routing,
                      cache.layers[i] if cache is not None else None)
        logits = self.output(self.norm(h)).float()
        logits = logits[..., : self.cfg.vocab_size]  # padded rows are never predicted
        moe = [layer.ffn for layer in self.layers if isinstance(layer.ffn, GroupedMoEFFN)]
        aux = sum((f.aux_loss for f in moe), torch.zeros((), device=h.device))
        mod = [layer for layer in self.layers if layer.causal_routers is not None]
        aux_router_loss = sum((m.aux_router_loss for m in [*moe, *mod]), torch.zeros((), device=h.device)) \
            if routing is not None and routing.aux_targets else None
        if labels is None:
            zero = torch.zeros((), device=h.device)
            return ModelOutput(loss=zero, ce_sum={}, tokens={}, z_loss=zero, aux_loss=aux, logits=logits,
                               aux_router_loss=aux_router_loss)
        out = self._loss(logits, labels, aux, return_logits)
        out.aux_router_loss = aux_router_loss
        return out

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor,
              return_logits: bool) -> ModelOutput:
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
        n = valid.sum().clamp(min=1)
        loss = ce.sum() / n
        z_loss = torch.zeros((), device=logits.device)
        if self.cfg.z_loss_weight > 0:
            # PaLM's z-loss: keeps log Z of the softmax near 0, which stabilises large-vocab training.
            z_loss = (torch.logsumexp(flat_logits, dim=-1).pow(2) * valid).sum() / n
        image_target = (flat_labels >= self.cfg.image_offset) & valid
        text_target = valid & ~image_target
        total = loss + self.cfg.z_loss_weight * z_loss + self.cfg.aux_loss_weight * aux
        return ModelOutput(
            loss=total,
            ce_sum={"text": (ce * text_target).sum().detach(), "image": (ce * image_target).sum().detach()},
            tokens={"text": text_target.sum(), "image": image_target.sum()},
            z_loss=z_loss.detach(), aux_loss=aux.detach() if torch.is_tensor(aux) else torch.tensor(aux),
            logits=logits if return_logits else None)

    # --- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int, canonical_name: Callable[[str], str] = str) -> None:
        """Deterministic init: each tensor is drawn from a generator seeded by (seed, its canonical
        name). With expert parallelism the caller maps a rank-local expert's name to its global one
        (training/expert_layout.py), so the same seed gives the same global model on any layout and
        experts start distinct."""
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            digest = hashlib.sha256(f"{seed}:{canonical_name(name)}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
            if name.endswith("norm.weight"):
                values = torch.ones(param.shape)
            else:
                std = self.cfg.init_std
                if name.endswith(("wo.weight", "w2.weight")):
                    std = std / (2 * self.cfg.n_layers) ** 0.5  # GPT-2's scaled init of residual outputs
                values = torch.randn(param.shape, generator=gen) * std
            param.copy_(values.to(param.dtype))

    def moe_gates(self) -> dict[str, nn.Module]:
        """layer.group -> gate, for routing statistics."""
        out = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer.ffn, GroupedMoEFFN):
                out.update({f"{i}.{g}": gate for g, gate in layer.ffn.gates().items()})
        return out

