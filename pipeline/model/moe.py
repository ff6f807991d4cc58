"""The MoE dispatch: routing metadata computed once per micro-batch, and a dispatch that does only
the work the routing asks for.

    routing = routing_info(input_ids, cfg)                    # once per micro-batch, outside the layers
    y = expert_choice(x_group, router, experts, routing.counts["text"], cf, exchange)   # per layer and group

Expert choice in a group of E experts over b tokens of its modality (pads excluded): expert j takes
its k = min(b, ceil(b · capacity_factor / E)) tokens with the highest router *logit* (ranking by the
sigmoid saturates in fp32 and breaks ties arbitrarily; the gate value is still sigmoid(logit); exact
ties go round robin over the experts, see `_expert_ranking`). The k tokens of every expert are
gathered into [E · k, d] rows, each local expert runs on exactly its rows (no padding to a common
capacity), and the outputs are combined with `index_add` in fp32.

Expert parallelism is not this module's business: an `exchange(rows, send_splits, recv_splits)`
(an all-to-all with exact split sizes, installed by training/engine.py) moves expert e's rows to the
rank that holds it and back. Every split size follows from the per-rank token counts of the
micro-batch (`RoutingInfo.counts`, one small exchange for all layers, made by the caller), so a layer
has no collective and no host sync of its own: a rank whose micro-batch holds no image token sends
0 image rows, and an image expert computes sum_r k_r rows, not ep · max_r k_r.

Token choice (for comparison): each token picks its top-k experts (softmax or sigmoid), each expert
keeps its C = min(b, ceil(b · k · capacity_factor / E)) highest-gate choosers (the slots it has no
chooser for are sent as gate-0 rows: token choice's capacity padding), plus the Switch load-balancing
loss.

Causal routing (inference, MoMa §2.4): expert choice looks at the whole batch, so each MoE layer and
group gets an auxiliary router (`AuxRouter`), fitted afterwards to expert choice's selections
(`selection_mask`, BCE); `causal_choice` then sends a token to expert j iff its aux score > 0.5.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# rows, send_splits (rows to each rank), recv_splits (rows from each rank) -> received rows
Exchange = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


ROUTING_MODES = ("ec", "causal")


@dataclasses.dataclass
class RoutingInfo:
    """What every MoE layer of one forward needs about its micro-batch."""

    members: dict[str, torch.Tensor]  # group -> flat indices of its tokens (pads excluded), long
    counts: dict[str, list[int]]  # group -> its token count on every rank of the expert-parallel group
    ep_rank: int = 0
    collect_stats: bool = False  # routing statistics (logged steps only: they cost host syncs)
    mode: str = "ec"  # ec: expert choice (training) | causal: each token alone, by the auxiliary routers
    aux_targets: bool = False  # fit the auxiliary routers to this forward's expert-choice selections

    @property
    def local_counts(self) -> dict[str, int]:
        return {g: c[self.ep_rank] for g, c in self.counts.items()}


def routing_info(input_ids: torch.Tensor, image_offset: int, pad_id: int | None, groups: Sequence[str],
                 collect_stats: bool = False, mode: str = "ec", aux_targets: bool = False) -> RoutingInfo:
    """Each group's members in `input_ids` (image tokens, text tokens, or all; pads in none), with
    this rank's counts only (the caller fills the other ranks' under expert parallelism)."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode must be one of {ROUTING_MODES}, got {mode!r}")
    flat = input_ids.reshape(-1)
    real = flat != pad_id if pad_id is not None else torch.ones_like(flat, dtype=torch.bool)
    image = flat >= image_offset
    masks = {"all": real, "text": real & ~image, "image": image}
    members = {g: masks[g].nonzero().squeeze(1) for g in groups}  # the micro-batch's one host sync
    return RoutingInfo(members, {g: [int(m.numel())] for g, m in members.items()}, 0, collect_stats, mode,
                       aux_targets)


def routing_subset(routing: RoutingInfo, keep: torch.Tensor, total: int, exchange: Exchange | None = None
                   ) -> RoutingInfo:
    """The routing metadata of a subset of the micro-batch's tokens (`keep`: flat indices, ascending;
    mixture-of-depths' kept tokens), indexed within the subset. Its counts depend on the MoD router,
    so under expert parallelism they are exchanged (`exchange.counts`)."""
    where = torch.full((total,), -1, dtype=torch.long, device=keep.device)
    where[keep] = torch.arange(keep.numel(), device=keep.device)
    members = {}
    for g, m in routing.members.items():
        pos = where[m]
        members[g] = pos[pos >= 0]
    names = sorted(members)
    counts = {g: [int(members[g].numel())] for g in names}
    if exchange is not None:
        every = exchange.counts([counts[g][0] for g in names])
        counts = {g: [row[i] for row in every] for i, g in enumerate(names)}
    return dataclasses.replace(routing, members=members, counts=counts)


def ec_capacity(tokens: int, experts: int, capacity_factor: float) -> int:
    return min(tokens, math.ceil(tokens * capacity_factor / experts))


def tc_capacity(tokens: int, experts: int, k: int, capacity_factor: float) -> int:
    return min(tokens, math.ceil(tokens * k * capacity_factor / experts))


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


def _expert_ranking(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's k best tokens by score: ([k, E] scores, [k, E] token indices). Ties go round
    robin: expert e ranks tied tokens from position e·b/E on, so identical experts with identical
    scores (an upcycled model's zero router) split the tokens instead of all taking the same first k.
    Without ties this is topk. One topk over unique int64 keys — the score's order-preserving bits
    above the rotated position — costs ~2x a plain topk on CPU (a stable sort of the columns: 4.5x)."""
    b, num_experts = scores.shape
    offsets = torch.arange(num_experts, device=scores.device) * b // num_experts
    position = torch.arange(b, device=scores.device).unsqueeze(1)
    order = (position + offsets) % b  # [b, E]: expert e's column, rotated by e·b/E
    rotated = scores.float().gather(0, order) + 0.0  # + 0.0 turns -0.0 into +0.0: the same score
    bits = rotated.view(torch.int32).long()
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # IEEE float order as integer order
    top = ((key << 32) | (b - 1 - position)).topk(k, dim=0).values  # ties: the lower rotated position
    picked = (b - 1) - (top & 0xFFFFFFFF)
    return scores.gather(0, order.gather(0, picked)), order.gather(0, picked)


def gumbel_sigmoid_scores(logits: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """(logits + scale · Logistic(0, 1)) / temperature: Gumbel-sigmoid (the difference of two Gumbels
    is logistic), fresh per token and expert."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    return (logits + scale * (u.log() - (-u).log1p())) / temperature


def expert_choice(x: torch.Tensor, router: nn.Linear, experts: nn.ModuleList, counts: list[int], ep_rank: int,
                  capacity_factor: float, exchange: Exchange | None = None,
                  noise: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """x [b, d]: this rank's tokens of the group. Returns the group's output [b, d] and what was
    done (slots per rank, rows per local expert, the selection) for statistics and tests. `noise`:
    (scale, temperature) of Gumbel-sigmoid noise on the logits (training after upcycling)."""
    num_experts = router.out_features
    slots = [ec_capacity(c, num_experts, capacity_factor) for c in counts]
    k = slots[ep_rank]
    logits = F.linear(x.float(), router.weight.float())  # [b, E], routing in fp32
    scores = logits if noise is None else gumbel_sigmoid_scores(logits, *noise)
    top_scores, top_tokens = _expert_ranking(scores, k)  # [k, E]: each expert's k best tokens
    token_index = top_tokens.t().reshape(-1)  # [E * k], expert-major
    gates = torch.sigmoid(top_scores).t().reshape(-1)
    y, rows = _run_experts(x.index_select(0, token_index), experts, slots, exchange, ep_rank)
    return _combine(x, token_index, gates, y), {"logits": logits, "token_index": token_index, "slots": slots,
                                                "rows": rows}


def token_choice(x: torch.Tensor, router: nn.Linear, experts: nn.ModuleList, counts: list[int], ep_rank: int,
                 capacity_factor: float, k: int, score: str, exchange: Exchange | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """Top-k token choice with per-expert capacity; returns output, the Switch aux loss, and stats."""
    b, num_experts = x.shape[0], router.out_features
    slots = [tc_capacity(c, num_experts, k, capacity_factor) for c in counts]
    cap = slots[ep_rank]
    logits = F.linear(x.float(), router.weight.float())
    probs = logits.softmax(-1) if score == "softmax" else torch.sigmoid(logits)
    top_p, top_e = probs.topk(k, dim=-1)  # [b, k]
    if score == "softmax" and k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    gate_of = torch.zeros_like(probs).scatter(1, top_e, top_p)  # [b, E]: a token's gate for each chosen expert
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_e, True)
    wanted = torch.where(chosen, probs.detach(), torch.full_like(probs, -1.0))
    best, best_tokens = wanted.topk(cap, dim=0)  # [cap, E]: each expert keeps its highest-gate choosers
    token_index = best_tokens.t().reshape(-1)
    expert_of = torch.arange(num_experts, device=x.device).repeat_interleave(cap)
    gates = gate_of[token_index, expert_of] * (best.t().reshape(-1) >= 0)  # empty slots: gate 0
    y, rows = _run_experts(x.index_select(0, token_index), experts, slots, exchange, ep_rank)
    n = max(b, 1)
    share = chosen.float().sum(0) / (n * k)
    l_aux = num_experts * (share * probs.sum(0) / n).sum()
    kept = torch.zeros(b, dtype=torch.long, device=x.device).index_add_(
        0, token_index, (best.t().reshape(-1) >= 0).long())
    return _combine(x, token_index, gates, y), l_aux, {"logits": logits, "token_index": token_index,
                                                       "slots": slots, "rows": rows, "kept": kept}


class AuxRouter(nn.Module):
    """The paper's auxiliary router of one MoE layer and group (MoMa §2.4), for causal inference:
    sigmoid(SiLU(x W1) W2), W1: d x d/2, W2: d/2 x E. `forward` returns the logits (the BCE is
    taken with logits); expert j takes a token iff its score > 0.5, i.e. its logit > 0."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_model // 2, bias=False)
        self.w2 = nn.Linear(d_model // 2, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x))).float()


def causal_choice(x: torch.Tensor, router: nn.Linear, aux: AuxRouter, experts: nn.ModuleList, ep_rank: int = 0,
                  exchange: Exchange | None = None) -> tuple[torch.Tensor, dict[str, object]]:
    """Causal routing: each token on its own goes to expert j iff its aux score_j > 0.5; the gate is
    the main router's sigmoid, as in expert choice. A token's output depends on that token alone, so
    the model's logits at t do not depend on tokens after t. How many rows each expert gets is
    data-dependent: under expert parallelism the per-expert counts are exchanged first
    (`exchange.counts`), then the rows."""
    num_experts, local = router.out_features, len(experts)
    logits = F.linear(x.float(), router.weight.float())
    pick = aux(x) > 0  # [b, E]
    expert_of, token_index = pick.t().nonzero(as_tuple=True)  # expert-major, like expert choice
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
    gates = torch.sigmoid(logits[token_index, expert_of])
    return _combine(x, token_index, gates, y), {"logits": logits, "token_index": token_index, "pick": pick}


def selection_mask(token_index: torch.Tensor, tokens: int, experts: int) -> torch.Tensor:
    """[tokens, experts] 1.0 where expert choice selected the token (token_index is expert-major)."""
    k = token_index.numel() // max(experts, 1)
    mask = torch.zeros(tokens, experts, device=token_index.device)
    if k:
        mask[token_index.view(experts, k), torch.arange(experts, device=token_index.device).unsqueeze(1)] = 1.0
    return mask


@torch.no_grad()
def aux_router_stats(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy, precision and recall of the auxiliary router's decisions against expert choice's."""
    pred = logits > 0
    truth = target > 0.5
    tp = (pred & truth).sum()
    return {"accuracy": (pred == truth).float().mean() if pred.numel() else logits.new_zeros(()),
            "precision": tp / pred.sum().clamp(min=1), "recall": tp / truth.sum().clamp(min=1)}


@torch.no_grad()
def routing_stats(logits: torch.Tensor, picks: torch.Tensor, per_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of one group's routing (logged steps only)."""
    n = max(picks.numel(), 1)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1)
    return {"tokens": torch.tensor(picks.numel()), "tokens_per_expert": per_expert,
            "picked_0": (picks == 0).sum() / n, "picked_1": (picks == 1).sum() / n,
            "picked_2plus": (picks >= 2).sum() / n,
            "router_entropy": entropy.mean() if picks.numel() else entropy.new_zeros(())}
