"""The MoE dispatch: a dispatch that does only the work the routing asks for. Which tokens go where
is routing.py's business; this module moves rows to experts and combines their outputs.

    routing = routing_info(input_ids, image_offset, pad_id, ["text", "image"])   # once per micro-batch
    y, sel = expert_choice(x_group, router, experts, routing.counts["text"], routing.ep_rank, 1.0, exchange)

The k slots of every expert (routing.Selection, expert-major) are gathered into [E · k, d] rows,
each local expert runs on exactly its rows (no padding to a common capacity), and the outputs are
combined with `index_add` in fp32, weighted by the gates (0 for an empty slot).

Expert parallelism is not this module's business either: an `Exchange` (an all-to-all with exact
split sizes, installed by training/engine.py) moves expert e's rows to the rank that holds it and
back. Every split size follows from the per-rank token counts of the micro-batch
(`RoutingInfo.counts`, one small exchange for all layers, made by the caller), so a layer has no
collective and no host sync of its own: a rank whose micro-batch holds no image token sends 0 image
rows, and an image expert computes sum_r k_r rows, not ep · max_r k_r. Causal routing sends a
data-dependent number of rows per expert, so it exchanges its per-expert counts first (inference).
"""

from __future__ import annotations

import torch
from torch import nn

from moma.pipeline.model.routing import (
    AuxRouter,
    Exchange,
    RouterAssign,
    RouterRank,
    Selection,
    causal_selection,
    select_expert_choice,
    select_token_choice,
)


def _run_experts(rows: torch.Tensor, experts: nn.ModuleList, per_rank_slots: list[int],
                 exchange: Exchange | None, ep_rank: int) -> tuple[torch.Tensor, list[int]]:
    """`rows` [E · k_self, d] in global expert order -> each expert's outputs, same order. With an
    exchange, rank q's k_q rows of local expert e are gathered from every rank, run, and returned.
    Returns the outputs and the rows each local expert processed."""
    local = len(experts)
    if exchange is None:
        k = per_rank_slots[ep_rank]
        outs = [expert(rows[e * k:(e + 1) * k]) for e, expert in enumerate(experts)]
        return torch.cat(outs) if outs else rows, [k] * local
    ep = len(per_rank_slots)
    send = [local * per_rank_slots[ep_rank]] * ep
    recv = [local * k for k in per_rank_slots]
    got = exchange(rows, send, recv)  # from rank q: its [local, k_q, d] rows for my experts
    by_rank = list(got.split(recv))
    pieces = [[blk[e * k:(e + 1) * k] for blk, k in zip(by_rank, per_rank_slots)] for e in range(local)]
    outs = [expert(torch.cat(pieces[e])) for e, expert in enumerate(experts)]
    # back to the layout the ranks sent: for rank q, its rows of expert 0, expert 1, ...
    back_by_expert = [list(out.split(per_rank_slots)) for out in outs]
    back = torch.cat([back_by_expert[e][q] for q in range(ep) for e in range(local)])
    return exchange(back, recv, send), [sum(per_rank_slots)] * local


def _combine(x: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over routes of gate · expert output, accumulated in fp32 (gates stay fp32, as routing)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_index, y.float() * gates.unsqueeze(1))
    return out.to(x.dtype)


def _dispatch(x: torch.Tensor, sel: Selection, experts: nn.ModuleList, exchange: Exchange | None,
              ep_rank: int) -> tuple[torch.Tensor, list[int]]:
    """Run a selection: gather its slots' rows, run the experts, combine. Returns the group's output
    and the rows each local expert processed."""
    y, rows = _run_experts(x.index_select(0, sel.token_index), experts, sel.slots, exchange, ep_rank)
    return _combine(x, sel.token_index, sel.gates, y), rows


def expert_choice(x: torch.Tensor, router: nn.Linear, experts: nn.ModuleList, counts: list[int], ep_rank: int,
                  capacity_factor: float, exchange: Exchange | None = None,
                  noise: tuple[float, float] | None = None, rank: RouterRank = "sigmoid",
                  assign: RouterAssign = "topk") -> tuple[torch.Tensor, Selection, list[int]]:
    """x [b, d]: this rank's tokens of the group. Returns the group's output [b, d], the selection
    and the rows each local expert processed. `noise`: (scale, temperature) of Gumbel-sigmoid noise
    on the router logits (training after upcycling)."""
    sel = select_expert_choice(x, router.weight, counts, ep_rank, capacity_factor, rank, assign, noise)
    y, rows = _dispatch(x, sel, experts, exchange, ep_rank)
    return y, sel, rows


def token_choice(x: torch.Tensor, router: nn.Linear, experts: nn.ModuleList, counts: list[int], ep_rank: int,
                 capacity_factor: float, k: int, score: str, exchange: Exchange | None = None
                 ) -> tuple[torch.Tensor, Selection, list[int]]:
    """Top-k token choice with per-expert capacity; the Switch aux loss is `Selection.aux_loss`."""
    sel = select_token_choice(x, router.weight, counts, ep_rank, capacity_factor, k, score)  # type: ignore[arg-type]
    y, rows = _dispatch(x, sel, experts, exchange, ep_rank)
    return y, sel, rows


def causal_choice(x: torch.Tensor, router: nn.Linear, aux: AuxRouter, experts: nn.ModuleList, ep_rank: int = 0,
                  exchange: Exchange | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """Causal routing: each token on its own goes to expert j iff its aux score_j > 0.5; the gate is
    the main router's sigmoid, as in expert choice. A token's output depends on that token alone, so
    the model's logits at t do not depend on tokens after t. How many rows each expert gets is
    data-dependent: under expert parallelism the per-expert counts are exchanged first
    (`exchange.counts`), then the rows."""
    num_experts, local = router.out_features, len(experts)
    token_index, expert_of, gates, logits = causal_selection(x, router.weight, aux)
    per_expert = torch.bincount(expert_of, minlength=num_experts).tolist()  # inference: one host sync
    rows = x.index_select(0, token_index)
    if exchange is None:
        if local != num_experts:
            raise RuntimeError("causal routing over experts on other ranks needs the expert-parallel exchange")
        y = torch.cat([expert(r) for expert, r in zip(experts, rows.split(per_expert))]) if rows.numel() else rows
    else:
        ep = num_experts // local
        every = exchange.counts(per_expert)  # [rank][expert]: rows each rank sends to each expert
        mine = slice(ep_rank * local, (ep_rank + 1) * local)
        send = [sum(per_expert[q * local:(q + 1) * local]) for q in range(ep)]
        recv = [sum(every[q][mine]) for q in range(ep)]
        got = exchange(rows, send, recv).split(recv)
        pieces = [list(blk.split(every[q][mine])) for q, blk in enumerate(got)]  # [source][local expert]
        outs = [expert(torch.cat([pieces[q][e] for q in range(ep)])) for e, expert in enumerate(experts)]
        by_source = [list(o.split([every[q][ep_rank * local + e] for q in range(ep)])) for e, o in enumerate(outs)]
        back = torch.cat([by_source[e][q] for q in range(ep) for e in range(local)])
        y = exchange(back, recv, send)
    return _combine(x, token_index, gates, y), {"logits": logits, "token_index": token_index}
