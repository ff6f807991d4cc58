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
from moma.pipeline.training.engine import build_model, expert_parallel_rank, initialize_engine
from moma.pipeline.training.expert_layout import ExpertLayout

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CASES = ["expert_choice:0", "expert_choice:1", "expert_choice:2", "token_choice:0"]
VOCAB, IMAGE_OFFSET, SEQ, MICRO = 300, 200, 32, 2


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    text = torch.randint(0, IMAGE_OFFSET, (MICRO, SEQ + 1), generator=g)
    mixed = torch.randint(0, IMAGE_OFFSET, (MICRO, SEQ + 1), generator=g)
    mixed[:, 4:28] = torch.randint(IMAGE_OFFSET, VOCAB, (MICRO, 24), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in (text, mixed)]


def model_config(ffn: str, router: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, image_offset=IMAGE_OFFSET, d_model=32, n_layers=2, n_heads=2,
                       ffn_hidden=64, ffn=ffn, router=router, capacity_factor=1.0, max_seq_len=SEQ,
                       z_loss_weight=1e-4)


def ep_records(ep: int, cases: list[str], steps: int = 3, ffn: str = "moma_4t4i") -> dict[str, dict]:
    """On every rank: per case (ROUTER:ZERO_STAGE) the logits and loss of the first forward, the
    gradients after the first backward (stage 0) and all parameters after `steps` optimizer steps,
    under *global* parameter names, plus the routing statistics."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ExpertLayout(ep, expert_parallel_rank(ep))
    batches = micro_batches()
    mine = batches if world == 1 else [batches[rank]]
    records: dict[str, dict] = {}
    for case in cases:
        router, stage = case.split(":")
        model = build_model(model_config(ffn, router), ep_size=ep, seed=7, ep_rank=layout.ep_rank)
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
                out = engine(x, y, return_logits=True)
                if step == 0:
                    micro_index = i if world == 1 else rank
                    record[f"logits{micro_index}"] = out.logits.detach().clone()
                    record[f"loss{micro_index}"] = out.loss.detach().clone()
                engine.backward(out.loss)
                if step == 0 and stage == "0" and engine.is_gradient_accumulation_boundary():
                    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()
                             if p.grad is not None}
                    record["grads"] = layout.globalise(engine.module, grads)
                engine.step()
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        record["params"] = layout.globalise(engine.module, params)
        record["stats"] = {k: {s: v.clone() for s, v in g.last_stats.items()}
                           for k, g in engine.module.moe_gates().items()}
        records[f"{router}_zero{stage}"] = record
        del engine
    return records


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    ref = run_distributed_test(ep_records, world_size=1, func_args=(1, ["expert_choice:0", "token_choice:0"]))
    ep2 = run_distributed_test(ep_records, world_size=2, func_args=(2, CASES))
    return {"ref": ref, "ep2": ep2}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_matches_single_rank(runs: dict, case: str) -> None:
    router, stage = case.split(":")
    ref = runs["ref"][0][f"{router}_zero0"]
    r0, r1 = (runs["ep2"][r][f"{router}_zero{stage}"] for r in (0, 1))
    # forward: each rank's micro-batch gives the single-rank logits
    assert float((r0["logits0"] - ref["logits0"]).abs().max()) < 1e-5
    assert float((r1["logits1"] - ref["logits1"]).abs().max()) < 1e-5
    # after 3 optimizer steps the whole model (both ranks' experts together) is the same
    assert max_diff({**r0["params"], **r1["params"]}, ref["params"]) < 1e-5
    if stage == "0":
        assert max_diff({**r0["grads"], **r1["grads"]}, ref["grads"]) < 1e-5


def test_uneven_modality_mix_is_real(runs: dict) -> None:
    r0, r1 = (runs["ep2"][r]["expert_choice_zero2"] for r in (0, 1))
    # rank 0 saw no image token at all; rank 1 did: their local capacities differed
    assert int(r0["stats"]["0.image"]["tokens"]) == 0 and int(r1["stats"]["0.image"]["tokens"]) > 0
    assert int(r0["stats"]["0.text"]["tokens"]) != int(r1["stats"]["0.text"]["tokens"])
