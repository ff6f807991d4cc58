"""Expert-choice routing modes (routing.py): who takes which tokens, on random and adversarial routers.

* `assign="balanced"` places every token exactly once at capacity factor >= 1, whatever the router
  (random, identical rows, all zero), and never a token twice;
* ranking by the softmax over the group's experts covers the tokens (about one expert per token at
  capacity factor 1 with independent rows), the paper's per-expert sigmoid ranking leaves a third to
  no expert at init and all but k to none when the rows coincide (the collapse the MoE issue measured);
* DeepSpeed's MOELayer gates (deepspeed_gates.py) route exactly as moe.py's dispatch in every mode,
  also on exact ties (the upcycled model's zero router);
* the Swin-style block (block_norm=swin) equals Chameleon's block written with torch's own modules.

    .venv/bin/python -m pytest tests/test_routing.py
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_fixtures import mixed_ids, small

from moma.pipeline.model.routing import ec_capacity, select_expert_choice, selection_stats
from moma.pipeline.training.engine import build_model, configure_accelerator

configure_accelerator()

MODES = [("sigmoid", "topk"), ("softmax", "topk"), ("sigmoid", "balanced"), ("softmax", "balanced")]


def router(kind: str, experts: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(experts, d, generator=g) * 0.02
    if kind == "identical":  # adversarial: every expert has the same row
        return (torch.randn(1, d, generator=g) * 0.02).expand(experts, d).contiguous()
    return torch.zeros(experts, d)  # an upcycled model's router


def expert_of(sel) -> torch.Tensor:
    e = sel.num_experts
    return torch.arange(e).repeat_interleave(sel.token_index.numel() // e)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 150), experts=st.integers(1, 8), kind=st.sampled_from(["random", "identical", "zero"]),
       cf=st.sampled_from([0.5, 1.0, 1.25, 2.0]), rank=st.sampled_from(["sigmoid", "softmax"]),
       seed=st.integers(0, 2 ** 16))
def test_balanced_places_every_token_once_while_slots_last(b: int, experts: int, kind: str, cf: float, rank: str,
                                                          seed: int) -> None:
    x = torch.randn(b, 16, generator=torch.Generator().manual_seed(seed + 1))
    sel = select_expert_choice(x, router(kind, experts, 16, seed), [b], 0, cf, rank, "balanced")
    k = ec_capacity(b, experts, cf)
    assert sel.token_index.numel() == experts * k  # the FLOPs of expert choice: k slots per expert
    placed = sel.token_index[sel.filled]
    assert placed.unique().numel() == placed.numel()  # never a token twice
    assert placed.numel() == min(b, experts * k)  # every token once when the slots suffice (cf >= 1)
    if cf >= 1:
        assert sorted(placed.tolist()) == list(range(b))
    assert (sel.gates[~sel.filled] == 0).all()  # empty slots add nothing
    stats = selection_stats(sel)
    assert float(stats["picked_0"]) == pytest.approx(1 - placed.numel() / b)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 120), experts=st.integers(1, 8), kind=st.sampled_from(["random", "identical", "zero"]),
       cf=st.sampled_from([0.5, 1.0, 2.0]), mode=st.sampled_from(MODES), seed=st.integers(0, 2 ** 16))
def test_every_mode_fills_slots_with_distinct_tokens_gated_by_the_sigmoid_of_the_chosen_logit(
        b: int, experts: int, kind: str, cf: float, mode: tuple[str, str], seed: int) -> None:
    x = torch.randn(b, 16, generator=torch.Generator().manual_seed(seed + 1))
    w = router(kind, experts, 16, seed)
    sel = select_expert_choice(x, w, [b], 0, cf, *mode)
    k = ec_capacity(b, experts, cf)
    filled = torch.ones_like(sel.token_index, dtype=torch.bool) if sel.filled is None else sel.filled
    for e in range(experts):  # an expert never takes a token twice
        mine = sel.token_index[e * k:(e + 1) * k][filled[e * k:(e + 1) * k]]
        assert mine.unique().numel() == mine.numel()
    if mode[1] == "topk":
        assert bool(filled.all())  # top-k fills every slot
    logits = x @ w.t()
    expected = torch.sigmoid(logits[sel.token_index, expert_of(sel)]) * filled
    assert torch.allclose(sel.gates, expected, atol=1e-6)


def no_expert_share(rank: str, assign: str, kind: str, experts: int = 4, seeds: int = 10) -> float:
    shares = []
    for seed in range(seeds):
        x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1000 + seed))
        sel = select_expert_choice(x, router(kind, experts, 64, seed), [512], 0, 1.0, rank, assign)
        shares.append(float((sel.picks() == 0).float().mean()))
    return sum(shares) / len(shares)


def test_softmax_ranking_takes_each_token_by_about_one_expert_where_sigmoid_ranking_overlaps() -> None:
    # independent random rows, 4 experts, capacity factor 1: E * k = b slots, so "about one expert per
    # token" means few tokens left to none. Per-expert sigmoid ranking: each expert takes its top quarter
    # independently, (3/4)^4 = 0.32 of the tokens go to none; softmax ranking splits them.
    sigmoid, softmax = no_expert_share("sigmoid", "topk", "random"), no_expert_share("softmax", "topk", "random")
    assert 0.27 < sigmoid < 0.37, sigmoid
    assert softmax < 0.2, softmax
    assert no_expert_share("softmax", "balanced", "random") == 0.0


def test_identical_rows_collapse_sigmoid_ranking_but_not_softmax_or_balanced() -> None:
    # the collapse mechanism: experts whose rows coincide rank the tokens alike and take the same k
    collapsed = no_expert_share("sigmoid", "topk", "identical", seeds=3)
    assert collapsed == pytest.approx(1 - 128 / 512)  # all four took the same quarter
    # over identical rows the softmax is uniform: exact ties, split round robin, every token once
    assert no_expert_share("softmax", "topk", "identical", seeds=3) == 0.0
    assert no_expert_share("sigmoid", "balanced", "identical", seeds=3) == 0.0


@pytest.mark.parametrize(("rank", "assign"), MODES)
@pytest.mark.parametrize("ffn", ["moma_4t4i", "moe_8x"])
@pytest.mark.parametrize("tied", [False, True])
def test_deepspeed_gates_route_as_the_moma_dispatch(rank: str, assign: str, ffn: str, tied: bool) -> None:
    cfg = small(ffn, router_rank=rank, router_assign=assign)
    ours = build_model(cfg, seed=1)
    ref = build_model(dataclasses.replace(cfg, moe_dispatch="deepspeed"), seed=1)
    ref.load_state_dict(ours.state_dict())
    if tied:  # zero routers and identical experts: only the tie rule decides who takes what
        with torch.no_grad():
            for model in (ours, ref):
                for name, p in model.named_parameters():
                    if name.endswith("gate.wg.weight"):
                        p.zero_()
    ids = mixed_ids(2, 24, seed=4)
    assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-6)


@pytest.mark.parametrize("ffn", ["dense", "moma_4t4i", "moma_4t4i_mod"])
def test_swin_block_is_chameleons_post_norm_block(ffn: str) -> None:
    """Chameleon-7B (and the MoMa paper): h = x + norm(attention(x)); out = h + norm(ffn(h)), the
    norms on the outputs. Reference written with torch.nn.RMSNorm and the block's own sublayers."""
    model = build_model(small(ffn, n_layers=2, block_norm="swin"), seed=2).eval()
    ids = mixed_ids(2, 24, seed=5)
    routing = model.routing(ids)
    block = model.layers[1]  # not a MoD layer
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(6))
    is_image = ids >= 200

    def rms(norm) -> torch.nn.RMSNorm:
        ref = torch.nn.RMSNorm(32, eps=norm.eps)
        ref.weight.data.copy_(norm.weight.data)
        return ref

    with torch.no_grad():
        for norm in (block.attention_norm, block.ffn_norm):
            norm.weight.uniform_(0.5, 1.5)  # not the identity init, or the test could not see a misplaced norm
        h = x + rms(block.attention_norm)(block.attention(x, model.rope_cos, model.rope_sin))
        expected = h + rms(block.ffn_norm)(block.ffn(h, is_image, routing))
        got = block(x, is_image, model.rope_cos, model.rope_sin, routing)
    assert torch.allclose(got, expected, atol=1e-5)
    pre = build_model(small(ffn, n_layers=2), seed=2).eval()
    assert not torch.allclose(pre(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("rank", "assign"), MODES)
def test_every_mode_trains_a_step_with_gradients_to_the_routers(rank: str, assign: str) -> None:
    model = build_model(small("moma_4t4i", router_rank=rank, router_assign=assign), seed=0)
    ids = mixed_ids(2, 24, seed=1)
    out = model(ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("gate.wg.weight")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert math.isclose(float(out.loss.detach()), float(F.cross_entropy(out_logits(model, ids).reshape(-1, 300),
                                                               ids[:, 1:].reshape(-1))) +
                        model.cfg.z_loss_weight * float(out.z_loss), rel_tol=1e-5)


def out_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[:, :-1]).logits


def test_routing_health_per_layer_and_the_no_expert_warning() -> None:
    from moma.pipeline.training.metrics import RoutingWatch, routing_health

    def health(**mode: str) -> dict[str, dict[str, float]]:
        model = build_model(small("moma_4t4i", n_layers=3, **mode), seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():  # the collapse: every expert of a group has one row
                if name.endswith("gate.wg.weight"):
                    p.copy_(p[:1].expand_as(p))
            ids = mixed_ids(4, 24, seed=2)
            model(ids, routing=model.routing(ids, collect_stats=True))
        return routing_health(model)

    collapsed = health()
    assert sorted(collapsed) == [f"{layer}.{group}" for layer in range(3) for group in ("image", "text")]
    # 40 image tokens over 4 experts of 10: all take the same 10, so 30 of 40 go to none
    assert collapsed["0.image"] == {"0": 0.75, "1": 0.0, "2+": 0.25}
    assert all(sum(v.values()) == pytest.approx(1.0) for v in collapsed.values())
    balanced = health(router_assign="balanced")
    assert all(v == {"0": 0.0, "1": 1.0, "2+": 0.0} for v in balanced.values())

    watch = RoutingWatch(threshold=0.5, every=100)
    first = watch.check(10, collapsed)
    assert first and "6 of 6 layer groups" in first and "router_rank=softmax" in first
    assert watch.check(50, collapsed) is None  # not again within 100 steps
    assert watch.check(110, collapsed) is not None
    assert RoutingWatch(0.5).check(10, balanced) is None
    assert RoutingWatch(1.0).check(10, collapsed) is None  # 1 disables it


def test_heldout_routing_health_is_token_weighted_over_the_set() -> None:
    from moma.pipeline.training.evaluate import evaluate, model_forward
    from moma.pipeline.training.metrics import RoutingHealthTotals, routing_health

    model = build_model(small("moma_4t4i"), seed=0).eval()
    batches = []
    for seed, rows in ((1, 2), (2, 5)):  # batches of different sizes: a plain mean of shares would be wrong
        ids = mixed_ids(rows, 24, seed=seed)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    per_batch = []
    for batch in batches:  # each batch on its own, with its token counts
        with torch.no_grad():
            model(batch["input_ids"], routing=model.routing(batch["input_ids"], collect_stats=True))
        per_batch.append((routing_health(model), {k: float(g.last_stats["tokens"])
                                                   for k, g in model.moe_gates().items()}))
    health = RoutingHealthTotals(model)
    with torch.no_grad():
        result = evaluate(model_forward(model, collect_stats=True), batches, health=health)
    for key, shares in result["routing_health"].items():
        n = sum(tokens[key] for _, tokens in per_batch)
        for share in ("0", "1", "2+"):
            expected = sum(h[key][share] * tokens[key] for h, tokens in per_batch) / n
            assert shares[share] == pytest.approx(expected, abs=2e-4)
    assert "routing_health" not in evaluate(model_forward(model), batches)  # only when asked for
