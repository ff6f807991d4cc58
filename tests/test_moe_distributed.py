"""Expert parallelism on 2 real gloo ranks under the deepspeed launcher.

Reference: one process, expert-parallel size 1, the two micro-batches through gradient accumulation.
Under test: 2 ranks, expert-parallel size 2 (each rank holds half of every group's experts), one
micro-batch per rank — rank 0's is text only, rank 1's mostly image, so the ranks' expert-choice
capacities differ and must be agreed on every step. Same outputs, same gradients, same parameters
after optimizer steps; likewise under ZeRO-1 and ZeRO-2, and with the token-choice router.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch_fixtures import run_deepspeed, run_single

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = "tests/dist/ep_equivalence.py"
CASES = ["expert_choice:0", "expert_choice:1", "expert_choice:2", "token_choice:0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ep")
    run_single([WORKER, "--ep", "1", "--cases", "expert_choice:0", "token_choice:0", "--out", str(out / "ref")])
    run_deepspeed([WORKER, "--ep", "2", "--cases", *CASES, "--out", str(out / "ep2")], log=out / "ep2.log")
    return out


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)  # our own test records (tensors and dicts of them)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_matches_single_rank(runs: Path, case: str) -> None:
    router, stage = case.split(":")
    ref = load(runs / "ref" / f"{router}_zero0_rank0.pt")
    r0, r1 = (load(runs / "ep2" / f"{router}_zero{stage}_rank{r}.pt") for r in (0, 1))
    # forward: each rank's micro-batch gives the single-rank logits
    assert float((r0["logits0"] - ref["logits0"]).abs().max()) < 1e-5
    assert float((r1["logits1"] - ref["logits1"]).abs().max()) < 1e-5
    # after 3 optimizer steps the whole model (both ranks' experts together) is the same
    assert max_diff({**r0["params"], **r1["params"]}, ref["params"]) < 1e-5
    if stage == "0":
        assert max_diff({**r0["grads"], **r1["grads"]}, ref["grads"]) < 1e-5


def test_uneven_modality_mix_is_real(runs: Path) -> None:
    r0 = load(runs / "ep2" / "expert_choice_zero2_rank0.pt")
    r1 = load(runs / "ep2" / "expert_choice_zero2_rank1.pt")
    # rank 0 saw no image token at all; rank 1 did: their local capacities differed
    assert int(r0["stats"]["0.image"]["tokens"]) == 0 and int(r1["stats"]["0.image"]["tokens"]) > 0
    assert int(r0["stats"]["0.text"]["tokens"]) != int(r1["stats"]["0.text"]["tokens"])
