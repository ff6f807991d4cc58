"""The one place where parallelism is wired: process groups, the model on this rank, the DeepSpeed engine.

    info = init_distributed()                          # deepspeed / torchrun / srun environments
    ep_rank = expert_parallel_rank(ep_size)            # DeepSpeed's expert + expert-data groups
    model = build_model(model_cfg, ep_size, seed, ep_rank)
    engine = initialize_engine(model, ds_config, weight_decay, lr_lambda)

The model code knows nothing of this: it only holds `E / ep_size` experts per MoE layer; which
global experts those are, and their names, is expert_layout.py's business.
DeepSpeed's MoE machinery does the rest: its expert-parallel and expert-data-parallel groups
(created here through DeepSpeed's own function, before the engine, so that experts can be
initialised by their *global* index), MoE parameter groups for the ZeRO optimizer
(`split_params_into_different_moe_groups_for_optimizer`), and per-expert checkpoint files.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.model.transformer import Transformer
from moma.pipeline.training.expert_layout import ExpertLayout, init_weights


def configure_accelerator() -> None:
    """DeepSpeed picks its accelerator at import; on a machine without CUDA make it the CPU (quietly)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the deepspeed launcher / torchrun (RANK...) or srun (SLURM_*)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_NTASKS", "1")),
                int(os.environ.get("SLURM_LOCALID", "0")))
    return 0, 1, 0


def uses_cuda(backend: str | None = None) -> bool:
    """Whether this rank computes on a GPU: CUDA is visible, DeepSpeed's accelerator is CUDA
    (DS_ACCELERATOR unset or "cuda") and the backend asked for is not gloo. So a gloo test
    (DS_ACCELERATOR=cpu) stays on the CPU on a GPU machine too, two ranks on a one-GPU machine included."""
    if backend == "gloo" and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator (at first use)
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: nccl on GPUs, gloo on CPU (or when asked for:
    then on the CPU, whatever GPUs are visible)."""
    cuda = uses_cuda(backend)
    configure_accelerator()
    import deepspeed

    rank, world, local = launch_env()
    if "RANK" not in os.environ:  # srun or a bare single process: export what torch.distributed reads
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} needs GPU {local}, but {torch.cuda.device_count()} GPU(s) are "
                               f"visible: launch at most that many ranks per node (or DS_ACCELERATOR=cpu for gloo)")
        torch.cuda.set_device(local)
        enable_tf32()
    deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"))
    if not cuda:
        _unlink_shm_buffer(rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local,
                    device=torch.device(f"cuda:{local}" if cuda else "cpu"))


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (Ampere and later): the fp32 presets
    (zero*_fp32) otherwise run at a fraction of the GPU's rate. Weights, master copies, gradients and
    reductions stay fp32; only the matmul inputs are rounded to a 10-bit mantissa (as Megatron and
    torchtitan do by default). MOMA_TF32=0 turns it off (bitwise fp32 matmuls)."""
    if os.environ.get("MOMA_TF32", "1") != "0":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU collective maps a 66 MB /dev/shm buffer per rank and never removes it: every
    launch leaked 66 MB x ranks of RAM (tmpfs) until the machine ran out. Every rank maps every other
    rank's buffer inside init_distributed, so after a barrier each rank can unlink its own name; the
    mappings live on until the processes exit, also when they are killed."""
    import glob

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    port = os.environ.get("MASTER_PORT", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # the name deepspeed.moe.layer.MoE gives its expert group


def expert_parallel_rank(ep_size: int) -> int:
    """Create DeepSpeed's expert-parallel / expert-data-parallel groups for `ep_size` (if not yet)
    and return this rank's index inside its expert-parallel group."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if not dist.is_initialized():
        if ep_size != 1:
            raise RuntimeError("expert parallelism needs torch.distributed to be initialised")
        return 0
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_rank(name)


def build_model(cfg: ModelConfig, ep_size: int = 1, seed: int = 0, ep_rank: int = 0,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """This rank's model (its `E / ep_size` experts per group), initialised by global names, its
    parameters in `dtype`. Floating-point buffers stay fp32: the RoPE tables in bf16 put cos/sin
    off by up to 2e-3 (4e-3 in the angle), as DeepSpeed's own bf16 cast keeps buffers too.
    Built on `device` and cast before the weights are drawn: the host never holds the whole fp32
    model (28 GB per rank for 1.4b moma_4t4i at ep 1), only one tensor's CPU draw at a time, and the
    values are those of an fp32 CPU build cast to `dtype`, bit for bit."""
    with torch.device(device):
        model = Transformer(cfg, ep_size=ep_size)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    init_weights(model, seed, ExpertLayout(ep_size, ep_rank))
    return model


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms; then DeepSpeed splits expert parameters into their own groups
    (reduced over the expert-data-parallel group instead of the data-parallel group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def initialize_engine(model: torch.nn.Module, ds_config: dict[str, Any], weight_decay: float = 0.0,
                      lr_lambda: Callable[[int], float] | None = None) -> Any:
    """deepspeed.initialize with MoE parameter groups; the optimizer comes from ds_config['optimizer'].
    Under expert parallelism the MoE layers get their all-to-all (exact split sizes) here."""
    import deepspeed

    params = optimizer_param_groups(model, weight_decay)

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda or (lambda step: 1.0))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                           lr_scheduler=scheduler)
    install_expert_exchange(engine.module)
    return engine


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single with split sizes; its backward is the same exchange the other way."""

    @staticmethod
    def forward(ctx: Any, group: Any, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.send, ctx.recv = group, send, recv
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        import torch.distributed as dist

        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return None, back, None, None


class AllToAll:
    """The expert-parallel exchange of moe.py: rows to and from every rank of the group, with exact
    split sizes (gloo and NCCL both take them), differentiable."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        return _AllToAllRows.apply(self.group, rows, send, recv)

    def counts(self, mine: list[int]) -> list[list[int]]:
        """Every rank's list of counts (causal routing: rows per expert, known only after routing)."""
        import torch.distributed as dist

        nccl = dist.get_backend(self.group) == "nccl"  # gloo groups take CPU tensors, on a GPU machine too
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        t = torch.tensor(mine, dtype=torch.long, device=device)
        every = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(every, t, group=self.group)
        return [e.tolist() for e in every]


def _expert_group(module: torch.nn.Module) -> tuple[Any, int] | None:
    """(DeepSpeed's expert-parallel group, its size) of the model's MoE layers; None for ep 1."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    sizes = {m.ep_size for m in module.modules() if hasattr(m, "ep_size") and hasattr(m, "deepspeed_moe")}
    if not sizes or max(sizes) == 1 or not dist.is_initialized():
        return None
    ep = sizes.pop()
    return groups._get_expert_parallel_group(expert_group_name(ep)), ep


def install_expert_exchange(module: torch.nn.Module) -> None:
    """Give every MoE FFN the all-to-all of its expert-parallel group (ep > 1)."""
    from moma.pipeline.model.ffn import GroupedMoEFFN

    found = _expert_group(module)
    if found is None:
        return
    exchange = AllToAll(found[0])
    for m in module.modules():
        if isinstance(m, GroupedMoEFFN):
            m.exchange = exchange


def routing_for(module: torch.nn.Module, input_ids: torch.Tensor, collect_stats: bool = False) -> Any:
    """The micro-batch's routing metadata for all MoE layers of `module` (the model, or an engine's
    module): members from `input_ids`, and under expert parallelism every rank's token counts by
    group — one all-gather of a few integers per micro-batch, outside the model."""
    import torch.distributed as dist

    model = getattr(module, "module", module)
    routing = model.routing(input_ids, collect_stats)
    found = _expert_group(model)
    if routing is None or found is None:
        return routing
    group, ep = found
    names = sorted(routing.counts)
    mine = torch.tensor([routing.counts[g][0] for g in names], dtype=torch.long, device=input_ids.device)
    every = [torch.empty_like(mine) for _ in range(ep)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).tolist()
    routing.counts = {g: [row[i] for row in table] for i, g in enumerate(names)}
    routing.ep_rank = dist.get_rank(group)
    return routing
