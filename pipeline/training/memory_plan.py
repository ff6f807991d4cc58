"""Per-GPU memory of a training layout, planned before launch (`moma train CONFIG --dry-run`).

Items, per rank, for DeepSpeed 0.19.8 as the presets in ds_configs/ configure it:
  weights        bf16 (2 B) or fp32 (4 B) x this rank's parameters (shared + its E / ep experts)
  gradients      ZeRO-1 bf16 (BF16_Optimizer): a full fp32 accumulation buffer (4 B x local);
                 ZeRO-1 fp32: fp32 gradients (4 B x local); ZeRO-2: fp32 partitions (4 B x local / dp,
                 experts over their expert-data-parallel group)
  optimizer      fp32 master + Adam m + v = 12 B per partitioned parameter (0 on the GPU when offloaded)
  buckets        ZeRO-2: reduce_bucket_size elements x (2 with overlap_comm) in the parameters' dtype;
                 ZeRO-1: the flattened all-reduce buffer, min(5e8, local) fp32 elements
  activations    saved-for-backward bytes of one micro-batch, MEASURED on CPU: the model's own widths
                 and vocabulary with 1 and 2 layers (2 and 4 for mixture-of-depths), saved-tensor hooks
                 counting each storage once, parameters excluded; per token per layer + per token
                 (embedding, head, loss), then x micro_batch x seq_len (flash attention keeps O(seq)
                 per token, as the CPU kernel does)
  head_backward  the backward's largest transient: the fp32 gradient of the logits and its cast
                 (tokens x vocab x 6 B, computed)
  overhead       CUDA context + NCCL communicators + allocator slack: 2.5 GB (an estimate)

    python -m moma.pipeline.training.memory_plan --preset 1.4b --ffn moma_4t4i --world-size 64 --ep 4 \
        --micro-batch 2 --zero 2 [--gpu-memory 80]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

import torch

from moma.pipeline.model.config import ModelConfig
from moma.pipeline.training.config import ConfigError

GB = 1e9
OVERHEAD_BYTES = 2.5 * GB
MEASURE_TOKENS = 256  # tokens of the measuring micro-batch (per-token bytes do not depend on it)
ALLREDUCE_ELEMENTS = 500_000_000  # DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE (ZeRO-1 bf16 reduction buffer)


def _measuring_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """`cfg`'s model without initialisation cost: built on the meta device, materialised in `dtype`
    with small random weights (activation sizes do not depend on the values), fp32 RoPE tables."""
    from moma.pipeline.model.transformer import Transformer, rope_tables

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = (torch.ones(p.shape, dtype=dtype) if name.endswith("norm.weight")
                      else (torch.randn(p.shape, generator=g) * 0.02).to(dtype))
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model


def _batch(cfg: ModelConfig, micro: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three quarters text, a quarter image codes (one image span per row), as gpu_check.py."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.image_offset, (micro, seq + 1), generator=g)
    ids[:, seq // 4: seq // 2] = torch.randint(cfg.image_offset, cfg.vocab_size, (micro, seq // 2 - seq // 4),
                                              generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def saved_bytes(model: torch.nn.Module, micro: int, seq: int) -> int:
    """Bytes autograd keeps for the backward of one training forward (loss included): every saved
    tensor's storage counted once, the parameters' own storages excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids, labels = _batch(model.cfg, micro, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels, routing=model.routing(ids))
    del out
    return sum(seen.values())


@functools.lru_cache(maxsize=32)
def activation_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(bytes per token per layer, bytes per token outside the layers), measured on CPU."""
    step = 2 if cfg.ffn_spec.mod else 1  # MoD alternates routed and full layers: measure whole pairs
    sizes = {}
    for n in (step, 2 * step):
        model = _measuring_model(dataclasses.replace(cfg, n_layers=n, max_seq_len=max(cfg.max_seq_len,
                                                                                        MEASURE_TOKENS)), dtype)
        sizes[n] = saved_bytes(model, 1, MEASURE_TOKENS)
        del model
    per_layer = (sizes[2 * step] - sizes[step]) / step / MEASURE_TOKENS
    base = sizes[step] / MEASURE_TOKENS - per_layer * step
    return per_layer, base


ADVICE = {"activations": "lower parallel.micro_batch (parallel.grad_accum keeps the batch)",
          "weights": "a larger parallel.ep_size (fewer experts per GPU)",
          "gradients": "ZeRO-2 (a zero2_* preset) or more GPUs: gradients are partitioned over them",
          "optimizer": "more GPUs (ZeRO partitions) or zero2_offload_bf16",
          "buckets": "a smaller zero_optimization.reduce_bucket_size in your DeepSpeed config",
          "head_backward": "lower parallel.micro_batch (parallel.grad_accum keeps the batch)",
          "overhead": "the CUDA context and NCCL alone take this: a GPU this small cannot train"}


@dataclasses.dataclass
class MemoryPlan:
    items: dict[str, float]  # bytes per GPU
    gpu_memory_gb: float
    notes: list[str]

    @property
    def total(self) -> float:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GB

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def biggest(self) -> tuple[str, float]:
        return max(self.items.items(), key=lambda kv: kv[1])

    def describe(self) -> str:
        lines = ["# memory per GPU (planned)"]
        lines += [f"{name:<12} {value / GB:8.2f} GB" for name, value in self.items.items()]
        lines.append(f"{'total':<12} {self.total_gb:8.2f} GB of {self.gpu_memory_gb:g} GB: "
                     + ("fits" if self.fits else "DOES NOT FIT"))
        return "\n".join(lines + self.notes)

    def check(self) -> None:
        """ConfigError naming the biggest item when the layout does not fit."""
        if not self.fits:
            name, value = self.biggest()
            raise ConfigError(f"the layout needs {self.total_gb:.1f} GB per GPU, more than --gpu-memory "
                              f"{self.gpu_memory_gb:g} GB; the biggest item is {name} ({value / GB:.1f} GB): "
                              f"{ADVICE[name]}")


def working_ep_sizes(cfg: ModelConfig, world_size: int) -> list[int]:
    """Expert-parallel sizes that divide the world size and every group's number of experts."""
    spec = cfg.ffn_spec
    counts = [n for _, n in spec.groups] if spec.learned_routing else [1]
    return [ep for ep in range(1, world_size + 1) if world_size % ep == 0 and all(n % ep == 0 for n in counts)]


def plan_memory(cfg: ModelConfig, world_size: int, ep_size: int, micro_batch: int, seq_len: int, zero_stage: int,
                bf16: bool, gpu_memory_gb: float = 80.0, ds_config: dict[str, Any] | None = None) -> MemoryPlan:
    """The per-GPU plan of this layout (see the module docstring for each item)."""
    from moma.pipeline.model.accounting import count

    acc = count(cfg, seq_len)
    experts, shared = acc.expert_params, acc.total_params - acc.expert_params
    local = shared + experts / ep_size
    partition = shared / world_size + experts / world_size  # experts: E/ep over world/ep expert-data ranks
    zero = (ds_config or {}).get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    weight_bytes = 2 if bf16 else 4
    items = {"weights": weight_bytes * local}
    if zero_stage >= 2:
        items["gradients"] = 4 * partition
    else:
        items["gradients"] = 4 * local
    items["optimizer"] = 0.0 if offload else 12 * (partition if zero_stage >= 1 else local)
    if zero_stage >= 2:
        bucket = float(zero.get("reduce_bucket_size", 5e8))
        items["buckets"] = bucket * weight_bytes * (2 if zero.get("overlap_comm", True) else 1)
    else:
        items["buckets"] = 4 * min(ALLREDUCE_ELEMENTS, local)
    per_layer, base = activation_bytes_per_token(cfg, torch.bfloat16 if bf16 else torch.float32)
    tokens = micro_batch * seq_len
    items["activations"] = tokens * (per_layer * cfg.n_layers + base)
    # the largest transient of the backward, on top of what is saved: the loss's fp32 gradient of the
    # logits and its bf16 cast into the head (tokens x vocab x 6 B; computed, not measured)
    items["head_backward"] = tokens * cfg.padded_vocab * (4 + weight_bytes)
    items["overhead"] = OVERHEAD_BYTES
    notes = [f"activations: {per_layer / 1024:.1f} KiB per token per layer + {base / 1024:.1f} KiB per token "
             f"(embedding, head, loss) x {tokens} tokens (measured on CPU with saved-tensor hooks)"]
    if offload:
        notes.append("optimizer states (fp32 master + Adam) are offloaded to CPU memory")
    return MemoryPlan(items, gpu_memory_gb, notes)


def plan_for_run(plan: Any, gpu_memory_gb: float = 80.0) -> MemoryPlan:
    """The memory plan of a RunPlan (run_plan.plan_run): its model, world size, layout and preset."""
    from moma.pipeline.training.ds_config import precision, zero_stage

    c = plan.cfg
    return plan_memory(plan.model, plan.world_size, c.parallel.ep_size, c.parallel.micro_batch, c.data.seq_len,
                       zero_stage(plan.ds_config), precision(plan.ds_config) == "bf16", gpu_memory_gb, plan.ds_config)


def main() -> None:
    from moma.pipeline.model.config import preset
    from moma.pipeline.training.expert_layout import ParallelConfigError, check_parallel_layout

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="1.4b")
    ap.add_argument("--ffn", default="moma_4t4i")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--gpu-memory", type=float, default=80.0)
    args = ap.parse_args()
    cfg = preset(args.preset, ffn=args.ffn, max_seq_len=args.seq_len)
    try:
        check_parallel_layout(cfg, args.ep, args.world_size, args.zero)
    except ParallelConfigError as e:
        raise SystemExit(f"{e}; layouts that work on {args.world_size} GPUs: ep_size "
                         f"{', '.join(map(str, working_ep_sizes(cfg, args.world_size)))}") from None
    plan = plan_memory(cfg, args.world_size, args.ep, args.micro_batch, args.seq_len, args.zero, not args.fp32,
                       args.gpu_memory)
    print(plan.describe())


if __name__ == "__main__":
    main()
