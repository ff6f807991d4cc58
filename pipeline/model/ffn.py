"""The feed-forward half of a block: the only place the variants differ.

dense      SwiGLU
moma_1t1i  one SwiGLU per modality; each token goes through its own modality's FFN
moe_Nx     one DeepSpeed MoE layer over all tokens with a learned router
moma_NtMi  one DeepSpeed MoE layer per modality group; a group sees only its modality's tokens

The MoE layers are DeepSpeed's own modules (``deepspeed.moe.layer.MoE``: its Experts container, its
expert-parallel groups and ZeRO parameter groups, its per-expert checkpoint files) with our router
as the gate; the forward is moe.py's dispatch (each expert computes exactly its routed rows), or
DeepSpeed's MOELayer with `moe_dispatch: deepspeed` (the reference). `ep_size` only decides how many
experts each rank holds; the process groups and the all-to-all are wired in training/engine.py, and
global expert names live in training/expert_layout.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.model.deepspeed_gates import ExpertChoiceGate, TokenChoiceGate
from moma.pipeline.model.moe import causal_choice, expert_choice, token_choice
from moma.pipeline.model.routing import (
    AuxRouter,
    Exchange,
    RoutingInfo,
    aux_router_stats,
    ec_capacity,
    routing_info,
    selection_stats,
    tc_capacity,
)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DenseFFN(SwiGLU):
    def forward(self, x: torch.Tensor, is_image: torch.Tensor,  # type: ignore[override]
                routing: RoutingInfo | None = None) -> torch.Tensor:
        return super().forward(x)


class ModalityFFN(nn.Module):
    """moma_1t1i: fixed routing by modality, no learned router."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.text_ffn = SwiGLU(d_model, hidden)
        self.image_ffn = SwiGLU(d_model, hidden)

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, routing: RoutingInfo | None = None) -> torch.Tensor:
        flat, img = x.reshape(-1, x.shape[-1]), is_image.reshape(-1)
        out = torch.empty_like(flat)
        for ffn, mask in ((self.text_ffn, ~img), (self.image_ffn, img)):
            idx = mask.nonzero().squeeze(1)
            out.index_copy_(0, idx, ffn(flat.index_select(0, idx)))
        return out.view_as(x)


def build_moe(cfg: ModelConfig, num_experts: int, ep_size: int) -> nn.Module:
    """A DeepSpeed MoE layer of `num_experts` SwiGLU experts with our gate."""
    from deepspeed.moe.layer import MoE

    # num_experts % ep_size == 0 is checked before launch (training/expert_layout.py) and asserted by MoE()
    moe = MoE(hidden_size=cfg.d_model, expert=SwiGLU(cfg.d_model, cfg.ffn_hidden), num_experts=num_experts,
              ep_size=ep_size, k=1, min_capacity=0, use_rts=False)
    if cfg.router == "expert_choice":
        gate: nn.Module = ExpertChoiceGate(cfg.d_model, num_experts, cfg.capacity_factor, cfg.router_rank,
                                           cfg.router_assign)
    else:
        gate = TokenChoiceGate(cfg.d_model, num_experts, cfg.capacity_factor, cfg.token_choice_k,
                               cfg.token_choice_score)
    moe.deepspeed_moe.gate = gate  # MoE() takes no gate argument; replace before deepspeed.initialize
    return moe


class GroupedMoEFFN(nn.Module):
    """moe_Nx (one group, "all") or moma_NtMi (a "text" and an "image" group).

    `dispatch`: "moma" (moe.py: gather each expert's tokens, run it on exactly those, index_add in
    fp32; exact all-to-all splits under expert parallelism) or "deepspeed" (DeepSpeed's MOELayer:
    [E, C, d] capacity buffers, the reference the tests compare against). Both use DeepSpeed's MoE
    module: its Experts container (per-expert checkpoint files), its router weight `wg`, and the
    expert-parallel groups and ZeRO parameter groups the engine builds for it."""

    def __init__(self, cfg: ModelConfig, ep_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.group_names = [name for name, _ in cfg.ffn_spec.groups]
        for name, n in cfg.ffn_spec.groups:
            # "<group>_moe", never "...expert...": DeepSpeed files every MoE-module key containing
            # "expert" into the per-expert checkpoints.
            self.add_module(f"{name}_moe", build_moe(cfg, n, ep_size))
        self.aux_loss = torch.zeros(())
        self.exchange: Exchange | None = None  # expert parallelism's all-to-all, installed by training/engine.py
        self.last_rows: dict[str, list[int]] = {}  # rows each local expert processed in the last forward
        # the paper's auxiliary routers for causal inference (trained after pre-training, main model
        # frozen): one per group, named so that DeepSpeed keeps them out of the per-expert files
        self.causal_routers = nn.ModuleDict({name: AuxRouter(cfg.d_model, n) for name, n in cfg.ffn_spec.groups}) \
            if cfg.aux_routers else None
        self.aux_router_loss = torch.zeros(())
        self.aux_router_stats: dict[str, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, is_image: torch.Tensor, routing: RoutingInfo | None = None) -> torch.Tensor:
        if routing is None:
            if self.exchange is not None:
                raise RuntimeError("expert parallelism: the forward needs the micro-batch's routing metadata "
                                   "(training/engine.py routing_for)")
            # called on its own (tests, benchmarks): membership from the modality mask, no pads known
            routing = routing_info(is_image.long() * self.cfg.image_offset, self.cfg.image_offset, None,
                                   self.group_names)
        flat = x.reshape(-1, x.shape[-1])
        if (routing.mode == "causal" or routing.aux_targets) and self.causal_routers is None:
            raise ValueError("this model has no auxiliary routers (train them: moma train-aux-routers)")
        if self.cfg.moe_dispatch == "deepspeed" and routing.mode == "ec" and not routing.aux_targets:
            return self._deepspeed(flat, routing).view_as(x)
        out = torch.zeros_like(flat)
        aux = flat.new_zeros((), dtype=torch.float32)
        aux_router_loss = flat.new_zeros((), dtype=torch.float32)
        for name in self.group_names:
            moe = getattr(self, f"{name}_moe").deepspeed_moe
            idx = routing.members[name]
            xs = flat.index_select(0, idx)
            experts, gate = moe.experts.deepspeed_experts, moe.gate
            if routing.mode == "causal":
                y, done = causal_choice(xs, gate.wg, self.causal_routers[name], experts, routing.ep_rank,
                                        self.exchange)
                out = out.index_copy(0, idx, y)
                continue
            if self.cfg.router == "expert_choice":
                noise = (self.cfg.router_noise, self.cfg.router_noise_temperature) \
                    if self.training and self.cfg.router_noise > 0 else None
                y, sel, rows = expert_choice(xs, gate.wg, experts, routing.counts[name], routing.ep_rank,
                                             self.cfg.capacity_factor, self.exchange, noise, self.cfg.router_rank,
                                             self.cfg.router_assign)
            else:
                y, sel, rows = token_choice(xs, gate.wg, experts, routing.counts[name], routing.ep_rank,
                                            self.cfg.capacity_factor, self.cfg.token_choice_k,
                                            self.cfg.token_choice_score, self.exchange)
                aux = aux + sel.aux_loss
            out = out.index_copy(0, idx, y)
            self.last_rows[name] = rows
            if routing.aux_targets:  # fit this group's auxiliary router to expert choice's selections
                logits = self.causal_routers[name](xs.detach())
                target = sel.mask()
                aux_router_loss = aux_router_loss + F.binary_cross_entropy_with_logits(logits, target)
                if routing.collect_stats:
                    self.aux_router_stats[name] = aux_router_stats(logits, target)
            if routing.collect_stats:
                gate.last_stats = selection_stats(sel)
        self.aux_loss = aux
        self.aux_router_loss = aux_router_loss
        return out.view_as(x)

    def _common_capacity(self, name: str, routing: RoutingInfo) -> int:
        """DeepSpeed's buffers need one capacity on every rank: the largest local need, from every
        rank's token count in the routing metadata (no collective)."""
        n = dict(self.cfg.ffn_spec.groups)[name]
        if self.cfg.router == "expert_choice":
            return max(ec_capacity(c, n, self.cfg.capacity_factor) for c in routing.counts[name])
        return max(tc_capacity(c, n, self.cfg.token_choice_k, self.cfg.capacity_factor) for c in routing.counts[name])

    def _deepspeed(self, flat: torch.Tensor, routing: RoutingInfo) -> torch.Tensor:
        """DeepSpeed's MOELayer on each group's tokens (a capacity common to the expert-parallel group)."""
        if self.group_names == ["all"] and routing.members["all"].numel() == flat.shape[0]:
            self.all_moe.deepspeed_moe.gate.capacity = self._common_capacity("all", routing)
            out, aux, _ = self.all_moe(flat)
            self.aux_loss = aux
            return out
        out = torch.zeros_like(flat)
        aux = flat.new_zeros((), dtype=torch.float32)
        for name in self.group_names:
            idx = routing.members[name]
            moe = getattr(self, f"{name}_moe")
            moe.deepspeed_moe.gate.capacity = self._common_capacity(name, routing)
            y, l_aux, _ = moe(flat.index_select(0, idx))
            out = out.index_copy(0, idx, y)
            aux = aux + l_aux
        self.aux_loss = aux
        return out

    def gates(self) -> dict[str, nn.Module]:
        return {name: getattr(self, f"{name}_moe").deepspeed_moe.gate for name in self.group_names}


def build_ffn(cfg: ModelConfig, ep_size: int = 1) -> nn.Module:
    spec = cfg.ffn_spec
    if spec.kind == "dense":
        return DenseFFN(cfg.d_model, cfg.ffn_hidden)
    if spec.kind == "moma" and not spec.learned_routing:  # moma_1t1i
        return ModalityFFN(cfg.d_model, cfg.ffn_hidden)
    return GroupedMoEFFN(cfg, ep_size)
