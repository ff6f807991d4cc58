"""Where every expert lives: the one module that knows DeepSpeed's expert parameter names, which
global experts a rank holds, and which layouts can work.

    layout = ExpertLayout(ep_size=2, ep_rank=1)
    layout.global_names(model)      # local parameter name -> global name (expert index ep_rank * local + i)
    layout.held(4)                  # range(2, 4): the global experts of a 4-expert group on this rank
    check_parallel_layout(model_cfg, ep_size, world_size, zero_stage)   # before anything launches
    export_names(model_names)       # global name -> the export's clean name (and back: internal_names)

DeepSpeed's MoE layer stores rank-local experts as `....deepspeed_moe.experts.deepspeed_experts.{i}.…`
with i in [0, E / ep_size); its per-expert checkpoint files already use the global index. The model
(pipeline/model/) never sees any of this: it is built with `E / ep_size` experts per group, and
everything that needs a global name — layout-independent initialisation, the universal checkpoint
copy, export, tests comparing ep 1 with ep 2 — asks this module. Exports carry clean names without
DeepSpeed's containers (`layers.0.ffn.image.experts.0.w1.weight`, `layers.0.ffn.image.router.weight`;
a moma_1t1i FFN: `layers.0.ffn.image.w1.weight`), mapped here, both ways, from the model's own names.
DeepSpeed's expert-parallel groups are consecutive ranks: rank r is index r % ep_size of its group
and replica r // ep_size.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from torch import nn

from moma.pipeline.model.config import ModelConfig

EXPERT_MARK = ".deepspeed_experts."  # DeepSpeed's container of rank-local experts
MOE_MARK = ".deepspeed_moe."  # DeepSpeed's MOELayer inside a MoE module


class ParallelConfigError(ValueError):
    """A parallel layout DeepSpeed would reject (or crash on) later: caught before any process group."""


# internal (global) parameter name -> the export's clean name, rule by rule (first match of each applies)
_CLEAN_RULES = (
    (re.compile(r"\.(\w+)_moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."), r".\1.experts.\2."),
    (re.compile(r"\.(\w+)_moe\.deepspeed_moe\.gate\.wg\."), r".\1.router."),
    (re.compile(r"\.(\w+)_moe\.deepspeed_moe\.gate\."), r".\1.router."),
    (re.compile(r"\.(\w+)_moe\.deepspeed_moe\."), r".\1.moe."),
    (re.compile(r"\.ffn\.(\w+?)_ffn\."), r".ffn.\1."),
)


def clean_name(name: str) -> str:
    """A global parameter name without DeepSpeed's containers (what an export stores)."""
    for pattern, repl in _CLEAN_RULES:
        name = pattern.sub(repl, name, count=1)
    return name


def export_names(names: Iterable[str]) -> dict[str, str]:
    """Global parameter names -> clean names; refuses two names that would become one."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        clean = clean_name(name)
        if clean in seen:
            raise ValueError(f"export names: {name} and {seen[clean]} would both be stored as {clean}")
        seen[clean] = name
        out[name] = clean
    return out


def internal_names(names: Iterable[str]) -> dict[str, str]:
    """The model's global parameter names (`names`) keyed by their clean (exported) names."""
    return {clean: name for name, clean in export_names(names).items()}


def is_expert_param(name: str) -> bool:
    """An expert's own parameter (reduced over the expert-data-parallel group, saved per expert)."""
    return EXPERT_MARK in name


def check_parallel_layout(cfg: ModelConfig, ep_size: int, world_size: int, zero_stage: int) -> None:
    """Refuse layouts that cannot work, with the reason, before anything is launched."""
    spec = cfg.ffn_spec
    uses_moe = spec.learned_routing
    if ep_size < 1:
        raise ParallelConfigError(f"expert-parallel size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ParallelConfigError(f"world size {world_size} is not a multiple of expert-parallel size {ep_size}")
    if ep_size > 1 and not uses_moe:
        raise ParallelConfigError(f"expert-parallel size {ep_size} needs a learned-routing MoE FFN; {cfg.ffn} has "
                                  f"no DeepSpeed MoE layers (use ep_size 1)")
    for group, n in spec.groups if uses_moe else ():
        if n % ep_size:
            raise ParallelConfigError(f"{cfg.ffn}: the {group} group's {n} experts cannot be split evenly over "
                                      f"expert-parallel size {ep_size} (num_experts % ep_size = {n % ep_size})")
    if uses_moe and zero_stage == 3:
        raise ParallelConfigError("ZeRO stage 3 does not support DeepSpeed's native MoE layers (DeepSpeed refuses "
                                  "them at initialisation): use ZeRO stage 1 or 2")


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """One rank's place in the expert-parallel layout."""

    ep_size: int = 1
    ep_rank: int = 0

    @classmethod
    def of_rank(cls, rank: int, ep_size: int) -> ExpertLayout:
        return cls(ep_size, rank % ep_size)

    def held(self, num_experts: int) -> range:
        """The global indices of a group's experts that this rank holds."""
        local = num_experts // self.ep_size
        return range(self.ep_rank * local, (self.ep_rank + 1) * local)

    def global_name(self, name: str, num_local: int | None) -> str:
        """A parameter name with its local expert index rewritten to the global one."""
        if EXPERT_MARK not in name:
            return name
        head, tail = name.split(EXPERT_MARK, 1)
        local, rest = tail.split(".", 1)
        if num_local is None:
            raise ValueError(f"{name}: the number of local experts is needed to globalise it")
        return f"{head}{EXPERT_MARK}{self.ep_rank * num_local + int(local)}.{rest}"

    def global_names(self, module: nn.Module) -> dict[str, str]:
        """Every parameter's local name -> global name."""
        counts = {prefix: m.num_local_experts for prefix, m in module.named_modules()
                  if hasattr(m, "num_local_experts")}  # DeepSpeed's MoE modules
        return {n: self.global_name(n, counts.get(n.split(MOE_MARK, 1)[0])) for n, _ in module.named_parameters()}

    def globalise(self, module: nn.Module, values: dict[str, object]) -> dict[str, object]:
        """`values` keyed by local parameter names -> the same keyed by global names."""
        names = self.global_names(module)
        return {names[k]: v for k, v in values.items()}


def placement(cfg: ModelConfig, ep_size: int, world_size: int) -> list[str]:
    """Which global experts each rank holds, one line per rank (for `moma train --dry-run`)."""
    spec = cfg.ffn_spec
    if not spec.learned_routing:
        return [f"no MoE layers ({cfg.ffn}): every rank holds the whole FFN"]
    lines = []
    for rank in range(world_size):
        layout = ExpertLayout.of_rank(rank, ep_size)
        held = ", ".join(f"{g} experts {layout.held(n).start}-{layout.held(n).stop - 1}" for g, n in spec.groups)
        lines.append(f"rank {rank} (expert-parallel index {layout.ep_rank}, replica {rank // ep_size}): {held}")
    return lines


def init_weights(model: nn.Module, seed: int, layout: ExpertLayout) -> None:
    """The model's layout-independent initialisation, each tensor drawn from (seed, its global name):
    the same seed gives the same global model under any expert-parallel size."""
    names = layout.global_names(model)
    model.init_weights(seed, canonical_name=names.__getitem__)
