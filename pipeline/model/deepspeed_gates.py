"""DeepSpeed MOELayer gates that route with routing.py — the reference dispatch
(`ModelConfig.moe_dispatch = "deepspeed"`); the default dispatch is moe.py's. These are adapters
only: which tokens go where (selection, capacity, tie rule, Switch loss, statistics) is decided in
routing.py and converted here to DeepSpeed's layout.

DeepSpeed 0.19's MOELayer calls ``gate(x[S, d], used_token[S], True, use_tutel)`` and expects
``(l_aux, C, E, indices[R, S], locations[R, S], gates[R, S], exp_counts[E])``: for each of R routes
per token, the expert (-1 = no route), the slot in that expert's capacity buffer and the gate value.
It then dispatches an [E, C, d] buffer (all-to-all across the expert-parallel group), runs the
experts and combines ``sum_r gates[r] * expert_out``. Here R = E: route j is expert j. ``used_token``
marks the tokens of this group's modality; every other token gets no route, hence a zero output.

C sizes the all-to-all buffers, so it must be equal on every rank of the expert-parallel group even
when ranks hold different text/image mixes (gloo aborts on unequal sizes): C = min(b, ceil(b · cf /
E)) (token choice: · k) is the largest over the ranks of the micro-batch (every rank's token counts
are in the routing metadata, exchanged once outside the model), set as `capacity` before the layer
runs — no collective here. A rank with fewer selections leaves its extra slots empty.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from moma.pipeline.model.routing import (
    RouterAssign,
    RouterRank,
    Selection,
    select_expert_choice,
    select_token_choice,
    selection_stats,
)

GateOutput = tuple[torch.Tensor, int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _GroupGate(nn.Module):
    """Router weight ``wg`` (DeepSpeed's name, kept out of the expert checkpoint files), the common
    capacity of the expert-parallel group (from the routing metadata) and the last routing statistics."""

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

    def _select(self, x: torch.Tensor) -> Selection:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> GateOutput:
        s, e = x.shape[0], self.num_experts
        member = torch.arange(s, device=x.device) if used_token is None else used_token.bool().nonzero().squeeze(1)
        sel = self._select(x.index_select(0, member))
        k = sel.slots[0]
        capacity = max(self.capacity if self.capacity is not None else k, k, 1)
        expert_of = torch.arange(e, device=x.device).repeat_interleave(k)
        slot = torch.arange(k, device=x.device).repeat(e)
        keep = torch.ones_like(expert_of, dtype=torch.bool) if sel.filled is None else sel.filled
        # an empty slot holds token 0: drop it before writing, or it could overwrite token 0's real route
        ex, tok, sl = expert_of[keep], member[sel.token_index][keep], slot[keep]
        indices = torch.full((e, s), -1, dtype=torch.int32, device=x.device).index_put_((ex, tok), ex.to(torch.int32))
        locations = torch.zeros((e, s), dtype=torch.int32, device=x.device).index_put_((ex, tok), sl.to(torch.int32))
        # out of place, and also with k = 0: keeps the graph to wg, so wg gets a (zero) gradient on every
        # rank (ZeRO's gradient buckets must hold the same parameters everywhere)
        gates = sel.logits.new_zeros((e, s)).index_put((ex, tok), sel.gates[keep])
        exp_counts = torch.bincount(ex, minlength=e)
        self.last_stats = selection_stats(sel)
        aux = sel.aux_loss if sel.aux_loss is not None else sel.logits.new_zeros(())
        return aux, capacity, e, indices, locations, gates, exp_counts


class ExpertChoiceGate(_GroupGate):
    def __init__(self, d_model: int, num_experts: int, capacity_factor: float, rank: RouterRank = "sigmoid",
                 assign: RouterAssign = "topk") -> None:
        super().__init__(d_model, num_experts, capacity_factor)
        self.rank, self.assign = rank, assign

    def _select(self, x: torch.Tensor) -> Selection:
        return select_expert_choice(x, self.wg.weight, [x.shape[0]], 0, self.capacity_factor, self.rank, self.assign)


class TokenChoiceGate(_GroupGate):
    def __init__(self, d_model: int, num_experts: int, capacity_factor: float, k: int = 1,
                 score: Literal["softmax", "sigmoid"] = "softmax") -> None:
        super().__init__(d_model, num_experts, capacity_factor)
        self.k = k
        self.score = score

    def _select(self, x: torch.Tensor) -> Selection:
        return select_token_choice(x, self.wg.weight, [x.shape[0]], 0, self.capacity_factor, self.k, self.score)
