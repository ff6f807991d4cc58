"""Learned routers inside one modality group, as gates for DeepSpeed's MOELayer — the reference
dispatch (ModelConfig.moe_dispatch = "deepspeed"); the default dispatch is moe.py's.

DeepSpeed 0.19's MOELayer calls ``gate(x[S, d], used_token[S], True, use_tutel)`` and expects
``(l_aux, C, E, indices[R, S], locations[R, S], gates[R, S], exp_counts[E])``: for each of R routes
per token, the expert (-1 = dropped), the slot in that expert's capacity buffer and the gate value.
It then dispatches an [E, C, d] buffer (all-to-all across the expert-parallel group), runs the
experts and combines ``sum_r gates[r] * expert_out``. ``used_token`` marks the tokens of this
group's modality; every other token gets no route, hence a zero output from this group.

ExpertChoiceGate (the paper's router): scores s = sigmoid(x W_g); expert j takes the top
k = ceil(b * capacity_factor / E) tokens of the group by logit x W_g[:, j] (the order of s, without
its fp32 saturation) (b = the group's tokens on this
rank), gate g = s for a selected token, 0 otherwise; no load-balancing loss. Routes: R = E, route j
is expert j. TokenChoiceGate: each token picks its top-k experts (softmax or sigmoid scores),
experts keep at most C = ceil(b * k * capacity_factor / E) of them (highest gate first), with the
Switch-Transformer load-balancing loss.

Capacity C sizes the all-to-all buffers, so it must be equal on every rank of the expert-parallel
group even when ranks hold different text/image mixes (gloo aborts on unequal sizes). Each rank
computes its own k from its own tokens; the common C = max_r k_r comes from the micro-batch's routing
metadata (every rank's token counts, exchanged once outside the model), set as `capacity` before
the layer runs — no collective here. A rank with fewer selections leaves its extra slots empty.
Routing is a function of each rank's micro-batch alone: the same micro-batch routes the same way
under any expert-parallel size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GateOutput = tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _GroupGate(nn.Module):
    """Common part: router weight ``wg`` (DeepSpeed's name, kept out of the expert checkpoint files),
    the common capacity of the expert-parallel group (from the routing metadata) and routing statistics."""

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float) -> None:
        super().__init__()
        self.wg = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.capacity: int | None = None  # the expert-parallel group's common capacity (set per forward)
        self.last_stats: dict[str, torch.Tensor] = {}

    def _set_ep_group(self, ep_group: object) -> None:
        """DeepSpeed hands its MOELayer's gate the expert-parallel group; capacity comes from the
        routing metadata instead, so the gate keeps no group."""

    def _agree(self, local_capacity: int) -> int:
        """The buffer size every rank of the expert-parallel group uses: the largest local need (>= 1)."""
        return max(self.capacity if self.capacity is not None else local_capacity, local_capacity, 1)

    @torch.no_grad()
    def _record(self, logits: torch.Tensor, member: torch.Tensor, picked: torch.Tensor,
                exp_counts: torch.Tensor) -> None:
        """Per-forward statistics over this group's tokens (detached; for logging, never printed)."""
        n = member.sum().clamp(min=1)
        picks = picked[member]
        probs = logits[member].softmax(-1)
        entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1)
        self.last_stats = {
            "tokens": member.sum(),
            "tokens_per_expert": exp_counts.detach(),
            "picked_0": (picks == 0).sum() / n,
            "picked_1": (picks == 1).sum() / n,
            "picked_2plus": (picks >= 2).sum() / n,
            "router_entropy": entropy.mean() if picks.numel() else entropy.new_zeros(()),
        }


class ExpertChoiceGate(_GroupGate):
    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> GateOutput:
        s, e = x.shape[0], self.num_experts
        logits = F.linear(x.float(), self.wg.weight.float())  # routing in fp32, as DeepSpeed's gates
        scores = torch.sigmoid(logits)
        member = used_token.bool() if used_token is not None else torch.ones(s, dtype=torch.bool, device=x.device)
        b = int(member.sum())
        k = min(b, math.ceil(b * self.capacity_factor / e))
        capacity = self._agree(k)

        indices = torch.full((e, s), -1, dtype=torch.int32, device=x.device)
        locations = torch.zeros((e, s), dtype=torch.int32, device=x.device)
        # No `if k > 0` shortcut: with k = 0 (a rank without this modality) the empty scatter still
        # links wg into the graph, so wg gets a (zero) gradient on every rank; ZeRO's gradient buckets
        # must hold the same parameters everywhere.
        # rank by logit: the sigmoid saturates to 1.0 in fp32, and tied scores are broken arbitrarily
        ranked = logits.masked_fill(~member.unsqueeze(1), float("-inf"))
        top_logits, top_tokens = ranked.topk(k, dim=0)  # [k, E]: expert j's k best tokens
        top_scores = torch.sigmoid(top_logits)
        tok = top_tokens.t()  # [E, k]
        indices.scatter_(1, tok, torch.arange(e, device=x.device, dtype=torch.int32).unsqueeze(1).expand(e, k))
        locations.scatter_(1, tok, torch.arange(k, device=x.device, dtype=torch.int32).expand(e, k))
        gates = scores.new_zeros((e, s)).scatter(1, tok, top_scores.t())  # out of place: keeps the graph to wg
        exp_counts = torch.full((e,), k, dtype=torch.long, device=x.device)
        self._record(logits, member, (indices >= 0).sum(0), exp_counts)
        return logits.new_zeros(()), capacity, e, indices, locations, gates, exp_counts


class TokenChoiceGate(_GroupGate):
    def __init__(self, d_model: int, num_experts: int, capacity_factor: float, k: int = 1,
                 score: str = "softmax") -> None:
        super().__init__(d_model, num_experts, capacity_factor)
        self.k = k
        self.score = score

    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> GateOutput:
        s, e, k = x.shape[0], self.num_experts, self.k
        logits = F.linear(x.float(), self.wg.weight.float())
        probs = logits.softmax(-1) if self.score == "softmax" else torch.sigmoid(logits)
        member = used_token.bool() if used_token is not None else torch.ones(s, dtype=torch.bool, device=x.device)
        b = int(member.sum())
        local_cap = min(b, math.ceil(b * k * self.capacity_factor / e))
        capacity = self._agree(local_cap)

        top_p, top_e = probs.topk(k, dim=-1)  # [S, k]
        if self.score == "softmax" and k > 1:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        chosen = torch.zeros((s, e), dtype=torch.bool, device=x.device).scatter_(1, top_e, True) & member[:, None]
        # Each expert keeps its `local_cap` highest-gate tokens; the rest are dropped (residual only).
        wanted = torch.where(chosen, probs.detach(), torch.full_like(probs, -1.0))
        slot_of = torch.full((s, e), -1, dtype=torch.long, device=x.device)
        if local_cap > 0:
            best_val, best_tok = wanted.topk(local_cap, dim=0)  # [cap, E]
            ranks = torch.arange(local_cap, device=x.device).unsqueeze(1).expand_as(best_tok)
            slot_of.scatter_(0, best_tok, torch.where(best_val >= 0, ranks, torch.full_like(ranks, -1)))
        route_slot = slot_of.gather(1, top_e)  # [S, k]
        kept = (route_slot >= 0) & member[:, None]
        indices = torch.where(kept, top_e, torch.full_like(top_e, -1)).t().to(torch.int32).contiguous()
        locations = route_slot.clamp(min=0).t().to(torch.int32).contiguous()
        gates = (top_p * kept).t().contiguous()

        # Switch loss: E * sum_j (share of tokens choosing j) * (mean score of j), over the group.
        n = max(b, 1)
        share = chosen.float().sum(0) / (n * k)
        mean_p = (probs * member[:, None]).sum(0) / n
        l_aux = e * (share * mean_p).sum()
        exp_counts = (slot_of >= 0).sum(0)
        self._record(logits, member, kept.sum(1), exp_counts)
        return l_aux, capacity, e, indices, locations, gates, exp_counts
