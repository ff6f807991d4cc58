"""Which tokens go where: the one routing module. Every dispatch (moe.py's exact one, DeepSpeed's
MOELayer through deepspeed_gates.py, causal inference) takes its selections from here.

    routing = routing_info(input_ids, image_offset, pad_id, ["text", "image"])   # once per micro-batch
    sel = select_expert_choice(x_group, router.weight, routing.counts["text"], routing.ep_rank,
                               capacity_factor=1.0, rank="softmax", assign="topk")
    sel.token_index, sel.gates, sel.filled      # [E * k] slots, expert-major

Expert choice inside a modality group of E experts over b tokens (pads excluded). Every expert has
k = min(b, ceil(b · capacity_factor / E)) slots (so every mode spends the same FLOPs):
* `assign="topk"` (the paper): expert j takes its k best tokens by its ranking score;
  `rank="sigmoid"`: its own logit (the paper's sigmoid scores, ranked by logit: the sigmoid saturates
  in fp32); `rank="softmax"`: the softmax over the group's experts (Zhou et al.'s expert choice) —
  a token ranks high for the expert it prefers *over the others*, so experts stop all picking the
  same tokens (measured: the share of tokens no expert takes falls from ~0.5 to ~0.15).
* `assign="balanced"`: every token exactly once (when E · k >= b, i.e. capacity_factor >= 1). In
  round r each token not yet placed proposes to its r-th preferred expert (by logit); each expert
  accepts its best proposers by its ranking score until its k slots are full. After E rounds every
  token is placed: a token still out would have been refused by every expert, each then full, so
  E · k < b. Slots left empty (b not divisible by E) are gate-0 rows, like token choice's padding.
The gate is the paper's sigmoid(logit) of the chosen expert in every mode (not normalised over
experts). Exact ties go round robin (`_expert_ranking`): identical experts with identical scores (an
upcycled model's zero router) split the tokens, so the upcycled model starts as the 1t1i function.

Token choice (for comparison): each token picks its top-k experts (softmax or sigmoid), each expert
keeps its C = min(b, ceil(b · k · capacity_factor / E)) highest-gate choosers (empty slots: gate 0),
plus the Switch load-balancing loss.

Causal routing (inference, MoMa §2.4): expert choice looks at the whole batch, so each MoE layer and
group has an auxiliary router (`AuxRouter`) fitted to the selections above (`Selection.mask`, BCE);
`causal_selection` sends a token to expert j iff its aux score > 0.5.

Nothing here exchanges anything: `RoutingInfo.counts` (every rank's token count per group) is filled
by the caller once per micro-batch (training/engine.py), and each rank routes its own tokens, so a
micro-batch routes the same under any expert-parallel size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moma.pipeline.model.config import RouterAssign, RouterRank

RoutingMode = Literal["ec", "causal"]
ROUTING_MODES: tuple[str, ...] = ("ec", "causal")


class Exchange(Protocol):
    """Expert parallelism's all-to-all (installed by training/engine.py): `rows` split by
    `send_splits` (rows to each rank) -> the rows received (`recv_splits` from each rank); `counts`
    all-gathers one small list of ints per rank (data-dependent split sizes)."""

    def __call__(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor: ...

    def counts(self, mine: list[int]) -> list[list[int]]: ...


@dataclasses.dataclass
class RoutingInfo:
    """What every MoE layer of one forward needs about its micro-batch."""

    members: dict[str, torch.Tensor]  # group -> flat indices of its tokens (pads excluded), long
    counts: dict[str, list[int]]  # group -> its token count on every rank of the expert-parallel group
    ep_rank: int = 0
    collect_stats: bool = False  # routing statistics (logged steps only: they cost host syncs)
    mode: RoutingMode = "ec"  # ec: expert choice (training) | causal: each token alone, by the auxiliary routers
    aux_targets: bool = False  # fit the auxiliary routers to this forward's expert-choice selections

    @property
    def local_counts(self) -> dict[str, int]:
        return {g: c[self.ep_rank] for g, c in self.counts.items()}


def routing_info(input_ids: torch.Tensor, image_offset: int, pad_id: int | None, groups: Sequence[str],
                 collect_stats: bool = False, mode: RoutingMode = "ec", aux_targets: bool = False) -> RoutingInfo:
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


# --- capacity ------------------------------------------------------------------------------------

def ec_capacity(tokens: int, experts: int, capacity_factor: float) -> int:
    """Slots per expert under expert choice (every assignment mode)."""
    return min(tokens, math.ceil(tokens * capacity_factor / experts))


def tc_capacity(tokens: int, experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert under token choice."""
    return min(tokens, math.ceil(tokens * k * capacity_factor / experts))


# --- selections ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Selection:
    """One group's routing on this rank: every expert has `slots[ep_rank]` slots, expert-major."""

    token_index: torch.Tensor  # [E * k] the token in each slot (an empty slot holds token 0 at gate 0)
    gates: torch.Tensor  # [E * k] fp32
    slots: list[int]  # slots per expert on every rank of the expert-parallel group
    logits: torch.Tensor  # [b, E] fp32 router logits
    filled: torch.Tensor | None = None  # [E * k] bool, False for an empty slot; None: every slot filled
    aux_loss: torch.Tensor | None = None  # token choice's Switch load-balancing loss

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    def picks(self) -> torch.Tensor:
        """[b] how many experts took each token."""
        ones = torch.ones_like(self.token_index) if self.filled is None else self.filled.long()
        return torch.zeros(self.logits.shape[0], dtype=torch.long, device=ones.device).index_add_(
            0, self.token_index, ones)

    def mask(self) -> torch.Tensor:
        """[b, E] 1.0 where an expert took the token (the auxiliary routers' BCE target)."""
        b, e = self.logits.shape
        expert_of = torch.arange(e, device=self.token_index.device).repeat_interleave(self.token_index.numel() // e
                                                                                       if e else 0)
        value = torch.ones(self.token_index.shape, device=self.token_index.device) if self.filled is None \
            else self.filled.float()
        return torch.zeros(b, e, device=self.token_index.device).index_put_((self.token_index, expert_of), value,
                                                                            accumulate=True).clamp_(max=1.0)


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


def _balanced(scores: torch.Tensor, preference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token placed once while slots last (see the module docstring): ([E * k] token per slot,
    [E * k] filled). E rounds of one masked `_expert_ranking` each; no host sync."""
    b, e = scores.shape
    device = scores.device
    order = preference.argsort(dim=1, descending=True, stable=True)  # [b, E]: each token's experts, best first
    placed = torch.zeros(b, dtype=torch.bool, device=device)
    used = torch.zeros(e, dtype=torch.long, device=device)  # slots taken per expert
    slot_token = torch.zeros(e * k + 1, dtype=torch.long, device=device)  # the last entry takes the rejects
    slot_filled = torch.zeros(e * k + 1, dtype=torch.bool, device=device)
    rank = torch.arange(k, device=device).unsqueeze(1)  # [k, 1]
    neg_inf = torch.tensor(float("-inf"), device=device)
    for r in range(e):
        proposing = F.one_hot(order[:, r], e).bool() & ~placed.unsqueeze(1)  # [b, E]
        best, tokens = _expert_ranking(torch.where(proposing, scores.float(), neg_inf), k)  # [k, E]
        accept = (rank < (k - used)) & (best > float("-inf"))
        where = torch.where(accept, torch.arange(e, device=device) * k + used + rank, e * k)
        slot_token[where.reshape(-1)] = tokens.reshape(-1)
        slot_filled[where.reshape(-1)] = accept.reshape(-1)
        placed[tokens[accept]] = True
        used = used + accept.sum(0)
    return slot_token[:-1], slot_filled[:-1]


def gumbel_sigmoid_scores(logits: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """(logits + scale · Logistic(0, 1)) / temperature: Gumbel-sigmoid (the difference of two Gumbels
    is logistic), fresh per token and expert."""
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    return (logits + scale * (u.log() - (-u).log1p())) / temperature


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[b, E] fp32 router logits (routing decisions in fp32, as DeepSpeed's gates make them)."""
    return F.linear(x.float(), weight.float())


def select_expert_choice(x: torch.Tensor, weight: torch.Tensor, counts: list[int], ep_rank: int,
                         capacity_factor: float, rank: RouterRank = "sigmoid", assign: RouterAssign = "topk",
                         noise: tuple[float, float] | None = None) -> Selection:
    """x [b, d]: this rank's tokens of the group; weight [E, d]: the router. `noise`: (scale,
    temperature) of Gumbel-sigmoid noise on the logits (training after upcycling), used for ranking
    and gate alike."""
    num_experts = weight.shape[0]
    slots = [ec_capacity(c, num_experts, capacity_factor) for c in counts]
    k = slots[ep_rank]
    logits = router_logits(x, weight)
    noisy = logits if noise is None else gumbel_sigmoid_scores(logits, *noise)
    score = noisy.softmax(-1) if rank == "softmax" else noisy
    if assign == "balanced":
        token_index, filled = _balanced(score, noisy, k)
        expert_of = torch.arange(num_experts, device=x.device).repeat_interleave(k)
        return Selection(token_index, torch.sigmoid(noisy[token_index, expert_of]) * filled, slots, logits, filled)
    _, top_tokens = _expert_ranking(score, k)  # [k, E]: each expert's k best tokens
    token_index = top_tokens.t().reshape(-1)  # [E * k], expert-major
    gates = torch.sigmoid(noisy.gather(0, top_tokens)).t().reshape(-1)
    return Selection(token_index, gates, slots, logits)


def select_token_choice(x: torch.Tensor, weight: torch.Tensor, counts: list[int], ep_rank: int,
                        capacity_factor: float, k: int, score: Literal["softmax", "sigmoid"]) -> Selection:
    """Top-k token choice with per-expert capacity and the Switch load-balancing loss."""
    b, num_experts = x.shape[0], weight.shape[0]
    slots = [tc_capacity(c, num_experts, k, capacity_factor) for c in counts]
    cap = slots[ep_rank]
    logits = router_logits(x, weight)
    probs = logits.softmax(-1) if score == "softmax" else torch.sigmoid(logits)
    top_p, top_e = probs.topk(k, dim=-1)  # [b, k]
    if score == "softmax" and k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    gate_of = torch.zeros_like(probs).scatter(1, top_e, top_p)  # [b, E]: a token's gate for each chosen expert
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_e, True)
    wanted = torch.where(chosen, probs.detach(), torch.full_like(probs, -1.0))
    best, best_tokens = wanted.topk(cap, dim=0)  # [cap, E]: each expert keeps its highest-gate choosers
    token_index = best_tokens.t().reshape(-1)
    filled = best.t().reshape(-1) >= 0
    expert_of = torch.arange(num_experts, device=x.device).repeat_interleave(cap)
    gates = gate_of[token_index, expert_of] * filled  # empty slots: gate 0
    n = max(b, 1)
    share = chosen.float().sum(0) / (n * k)
    l_aux = num_experts * (share * probs.sum(0) / n).sum()
    return Selection(token_index, gates, slots, logits, filled, l_aux)


# --- causal routing ------------------------------------------------------------------------------

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


def causal_selection(x: torch.Tensor, weight: torch.Tensor, aux: AuxRouter
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token on its own: expert j iff aux score_j > 0.5, gated by the main router's sigmoid.
    Returns (token_index, expert_of, gates) expert-major and the [b, E] main-router logits."""
    logits = router_logits(x, weight)
    pick = aux(x) > 0  # [b, E]
    expert_of, token_index = pick.t().nonzero(as_tuple=True)  # expert-major, like expert choice
    return token_index, expert_of, torch.sigmoid(logits[token_index, expert_of]), logits


# --- statistics (logged steps only) --------------------------------------------------------------

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
    """One group's routing health: the share of its tokens taken by 0, 1 and 2+ experts, tokens per
    expert and the router's entropy over the group's experts."""
    n = max(picks.numel(), 1)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1)
    return {"tokens": torch.tensor(picks.numel()), "tokens_per_expert": per_expert,
            "picked_0": (picks == 0).sum() / n, "picked_1": (picks == 1).sum() / n,
            "picked_2plus": (picks >= 2).sum() / n,
            "router_entropy": entropy.mean() if picks.numel() else entropy.new_zeros(())}


def selection_stats(sel: Selection) -> dict[str, torch.Tensor]:
    """`routing_stats` of a selection (tokens per expert: its filled slots)."""
    e = sel.num_experts
    per_expert = (sel.filled.view(e, -1).sum(1) if sel.filled is not None
                  else torch.full((e,), sel.token_index.numel() // max(e, 1), device=sel.token_index.device))
    return routing_stats(sel.logits, sel.picks(), per_expert)
