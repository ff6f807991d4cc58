"""Expert parallelism on 2 real gloo ranks (tests/dist_fixtures.py: a function run on every rank).

Reference: one rank, expert-parallel size 1, the two micro-batches through gradient accumulation.
Under test: 2 ranks, expert-parallel size 2 (each rank holds half of every group's experts), one
micro-batch per rank — rank 0's is text only, rank 1's mostly image, so the ranks' expert-choice
capacities differ and must be agreed on every step. Same outputs, same gradients, same parameters
after optimizer steps; likewise under ZeRO-1 and ZeRO-2, and with the token-choice router.

    .venv/bin/python -m pytest tests/test_moe_distributed.py
"""

from __future__ import annotations

import pytest
import torch
from dist_fixtures import run_distributed_test

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.training.engine import build_model, expert_parallel_rank, initialize_engine, routing_for
from moma.pipeline.training.expert_layout import ExpertLayout

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, IMAGE_OFFSET, SEQ, MICRO = 300, 200, 32, 2


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    text = torch.randint(0, IMAGE_OFFSET, (MICRO, SEQ + 1), generator=g)
    mixed = torch.randint(0, IMAGE_OFFSET, (MICRO, SEQ + 1), generator=g)
    mixed[:, 4:28] = torch.randint(IMAGE_OFFSET, VOCAB, (MICRO, 24), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in (text, mixed)]


def model_config(ffn: str, router: str, dispatch: str = "moma") -> ModelConfig:
    """`router`: token_choice, expert_choice, or expert_choice.RANK.ASSIGN (routing.py's modes)."""
    router, *mode = router.split(".")
    modes = dict(zip(("router_rank", "router_assign"), mode))
    return ModelConfig(vocab_size=VOCAB, image_offset=IMAGE_OFFSET, d_model=32, n_layers=2, n_heads=2,
                       ffn_hidden=64, ffn=ffn, router=router, capacity_factor=1.0, max_seq_len=SEQ,
                       z_loss_weight=1e-4, moe_dispatch=dispatch, **modes)


def ep_records(ep: int, cases: list[str], steps: int = 3) -> dict[str, dict]:
    """On every rank, per case (FFN:ROUTER:ZERO_STAGE:DISPATCH): the logits and loss of the first
    forward, the full gradients after the first backward (safe_get_full_grad under ZeRO), all
    parameters after `steps` optimizer steps, under *global* names; the routing statistics and the
    rows each local expert processed."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ExpertLayout(ep, expert_parallel_rank(ep))
    batches = micro_batches()
    mine = batches if world == 1 else [batches[rank]]
    records: dict[str, dict] = {}
    for case in cases:
        ffn, router, stage, dispatch = case.split(":")
        model = build_model(model_config(ffn, router, dispatch), ep_size=ep, seed=7, ep_rank=layout.ep_rank)
        ds_config = {
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": len(mine),
            "zero_optimization": {"stage": int(stage)},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "weight_decay": 0.0, "torch_adam": True}},
            "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 9,
        }
        engine = initialize_engine(model, ds_config)
        record: dict[str, object] = {"rank": rank, "ep_rank": layout.ep_rank}
        for step in range(steps):
            for i, (x, y) in enumerate(mine):
                routing = routing_for(engine.module, x, collect_stats=True)
                out = engine(x, y, return_logits=True, routing=routing)
                if step == 0:
                    micro_index = i if world == 1 else rank
                    record[f"logits{micro_index}"] = out.logits.detach().clone()
                    record[f"loss{micro_index}"] = out.loss.detach().clone()
                    record["rows"] = {f"{j}.{g}": list(r) for j, layer in enumerate(engine.module.layers)
                                      for g, r in getattr(layer.ffn, "last_rows", {}).items()}
                engine.backward(out.loss)
                if step == 0 and engine.is_gradient_accumulation_boundary():
                    grads = {n: (p.grad if stage == "0" else safe_get_full_grad(p)).detach().clone()
                             for n, p in engine.module.named_parameters()}
                    record["grads"] = layout.globalise(engine.module, grads)
                engine.step()
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        record["params"] = layout.globalise(engine.module, params)
        record["stats"] = {k: {s: v.clone() for s, v in g.last_stats.items()}
                           for k, g in engine.module.moe_gates().items()}
        records[case] = record
        del engine
    return records


EP2 = ["moma_4t4i:expert_choice:0:moma", "moma_4t4i:expert_choice:1:moma", "moma_4t4i:expert_choice:2:moma",
       "moma_4t4i:token_choice:0:moma", "moe_8x:expert_choice:0:moma", "moma_4t4i_mod:expert_choice:2:moma",
       "moma_4t4i:expert_choice:0:deepspeed", "moma_4t4i:token_choice:0:deepspeed", "moe_8x:expert_choice:0:deepspeed",
       "moma_4t4i:expert_choice.softmax.topk:1:moma", "moma_4t4i:expert_choice.softmax.balanced:2:moma",
       "moma_4t4i:expert_choice.softmax.balanced:0:moma", "moma_4t4i:expert_choice.softmax.balanced:0:deepspeed"]
REF = ["moma_4t4i:expert_choice:0:moma", "moma_4t4i:token_choice:0:moma", "moe_8x:expert_choice:0:moma",
       "moma_4t4i_mod:expert_choice:0:moma", "moma_4t4i:expert_choice.softmax.topk:0:moma",
       "moma_4t4i:expert_choice.softmax.balanced:0:moma"]


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    return {"ref": run_distributed_test(ep_records, world_size=1, func_args=(1, REF)),
            "ep2": run_distributed_test(ep_records, world_size=2, func_args=(2, EP2))}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference_of(case: str) -> str:
    ffn, router, _, _ = case.split(":")
    return f"{ffn}:{router}:0:moma"


@pytest.mark.parametrize("case", [c for c in EP2 if c.endswith(":moma")])
def test_expert_parallel_matches_single_rank(runs: dict, case: str) -> None:
    """ep 2 (rank 0's micro-batch is text only) against ep 1 on both micro-batches: the same logits, the
    same full gradients (also under ZeRO-1/2: safe_get_full_grad — a 2x gradient-scale error shows
    here, where Adam's near scale-invariance would hide it in the parameters), the same parameters."""
    ref = runs["ref"][0][reference_of(case)]
    r0, r1 = (runs["ep2"][r][case] for r in (0, 1))
    assert float((r0["logits0"] - ref["logits0"]).abs().max()) < 1e-5
    assert float((r1["logits1"] - ref["logits1"]).abs().max()) < 1e-5
    # every rank holds the full gradient of what it owns: shared parameters everywhere, its experts
    assert max_diff({**r1["grads"], **r0["grads"]}, ref["grads"]) < 1e-6
    assert max_diff({**r0["params"], **r1["params"]}, ref["params"]) < 1e-5


@pytest.mark.parametrize("ffn_router", ["moma_4t4i:expert_choice", "moe_8x:expert_choice", "moma_4t4i:token_choice",
                                        "moma_4t4i:expert_choice.softmax.balanced"])
def test_the_new_dispatch_equals_deepspeeds_moelayer(runs: dict, ffn_router: str) -> None:
    """Same weights, same micro-batches, on 2 ranks (one holding only text): DeepSpeed's MOELayer and
    moe.py's dispatch give the same outputs and every gradient (fp32, 1e-6)."""
    for rank in (0, 1):
        ours, theirs = (runs["ep2"][rank][f"{ffn_router}:0:{d}"] for d in ("moma", "deepspeed"))
        assert float((ours[f"logits{rank}"] - theirs[f"logits{rank}"]).abs().max()) < 1e-6
        assert max_diff(ours["grads"], theirs["grads"]) < 1e-6


def test_uneven_modality_mix_is_real_and_only_routed_rows_are_computed(runs: dict) -> None:
    r0, r1 = (runs["ep2"][r]["moma_4t4i:expert_choice:2:moma"] for r in (0, 1))
    # rank 0 saw no image token at all; rank 1 did: their local capacities differ
    image = [int(r["stats"]["0.image"]["tokens"]) for r in (r0, r1)]
    text = [int(r["stats"]["0.text"]["tokens"]) for r in (r0, r1)]
    assert image[0] == 0 and image[1] > 0 and text[0] != text[1]
    k_image = [int(r["stats"]["0.image"]["tokens_per_expert"][0]) for r in (r0, r1)]  # each rank's slots
    k_text = [int(r["stats"]["0.text"]["tokens_per_expert"][0]) for r in (r0, r1)]
    assert k_image[0] == 0 and k_image[1] * 4 >= image[1] and k_text[0] * 4 >= text[0]  # every token has a slot
    for r in (r0, r1):  # each local expert ran exactly the rows routed to it from both ranks
        assert r["rows"]["0.image"] == [sum(k_image)] * 2 and r["rows"]["0.text"] == [sum(k_text)] * 2
    assert sum(k_image) < 2 * max(k_image)  # not ep x max_r k_r, as a common capacity would compute


def _master_port() -> str:
    import os

    return os.environ["MASTER_PORT"]


def test_ranks_leave_no_shared_memory_behind() -> None:
    """DeepSpeed's CPU collective maps a 66 MB /dev/shm buffer per rank and never removes it; every
    launch leaked them until the machine ran out of memory. init_distributed unlinks them."""
    import os

    port = run_distributed_test(_master_port, world_size=2)[0]
    left = [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and
            f.rsplit("_", 2)[1] == port]
    assert left == []
