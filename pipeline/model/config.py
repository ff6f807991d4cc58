"""Model configuration and presets: one dataclass, the paper's sizes, every FFN variant.

FFN variants (the paper's names; experts are each the size of the dense FFN):
  dense        one SwiGLU FFN
  moe_Nx       N experts over all tokens, learned routing (moe_8x in the paper)
  moma_1t1i    one FFN per modality, tokens routed by modality only
  moma_NtMi    N text experts and M image experts; learned routing inside each modality group

    moma model info --preset 1.4b --ffn moma_4t4i
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal

FFN_PATTERN = re.compile(r"^(dense|moe_(?P<n>\d+)x|moma_(?P<t>\d+)t(?P<i>\d+)i)(?P<mod>_mod)?$")
Router = Literal["expert_choice", "token_choice"]
RouterRank = Literal["sigmoid", "softmax"]  # routing.py
RouterAssign = Literal["topk", "balanced"]  # routing.py
BlockNorm = Literal["pre", "swin"]


@dataclasses.dataclass(frozen=True)
class FFNSpec:
    """Parsed FFN variant: the expert groups and whether routing inside them is learned."""

    kind: str  # "dense" | "moe" | "moma"
    groups: tuple[tuple[str, int], ...] = ()  # ("all", 8) | (("text", 4), ("image", 4))
    mod: bool = False  # mixture-of-depths on alternating layers ("<variant>_mod")

    @property
    def learned_routing(self) -> bool:
        """A learned router, i.e. DeepSpeed MoE layers (never for dense or moma_1t1i)."""
        return any(n > 1 for _, n in self.groups) or self.kind == "moe"

    @property
    def num_experts(self) -> int:
        return sum(n for _, n in self.groups)


def parse_ffn(name: str) -> FFNSpec:
    m = FFN_PATTERN.match(name)
    if not m:
        raise ValueError(f"unknown FFN variant {name!r}: use dense, moe_<N>x, moma_1t1i or moma_<N>t<M>i, "
                         f"optionally with _mod (mixture-of-depths)")
    mod = bool(m.group("mod"))
    if m.group(1) == "dense":
        return FFNSpec("dense", mod=mod)
    if m.group("n"):
        n = int(m.group("n"))
        if n < 1:
            raise ValueError(f"{name}: need at least one expert")
        return FFNSpec("moe", (("all", n),), mod)
    t, i = int(m.group("t")), int(m.group("i"))
    if t < 1 or i < 1:
        raise ValueError(f"{name}: each modality group needs at least one expert")
    return FFNSpec("moma", (("text", t), ("image", i)), mod)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # the unified vocabulary (text + controls + image codes)
    image_offset: int  # first image-code id: a token is an image token iff id >= image_offset
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 512  # SwiGLU hidden size of the dense FFN and of each expert
    ffn: str = "moma_4t4i"
    router: Router = "expert_choice"  # learned routing inside a group
    # expert choice (routing.py): how an expert ranks its group's tokens — sigmoid: its own logit (the
    # paper); softmax: the softmax over the group's experts (Zhou et al.) — and how slots are filled —
    # topk: each expert its k best (the paper); balanced: every token once (capacity_factor >= 1)
    router_rank: RouterRank = "sigmoid"
    router_assign: RouterAssign = "topk"
    capacity_factor: float = 1.0  # EC: expert takes ceil(b_M * cf / |E_M|) tokens; TC: slots per expert
    token_choice_k: int = 1
    token_choice_score: Literal["softmax", "sigmoid"] = "softmax"
    # pre: x + f(norm(x)) (pre-norm); swin: x + norm(f(x)) for attention and FFN/MoMa (Chameleon-7B's
    # and the paper's Swin-style normalisation: raw gates and two-expert sums never reach the residual)
    block_norm: BlockNorm = "pre"
    aux_loss_weight: float = 0.01  # token choice's load-balancing loss; expert choice has none
    z_loss_weight: float = 1e-5  # PaLM's z-loss on the output logits; 0 disables it
    qk_norm: bool = True
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    init_std: float = 0.02
    pad_vocab_multiple: int = 64  # embedding/output rows padded for efficient matmuls
    pad_id: int | None = None  # the vocabulary's <|pad|>: routed to no expert (set from the tokenizers)
    # moma: exact work (moe.py) | deepspeed: DeepSpeed's MOELayer (the reference, deepspeed_gates.py)
    moe_dispatch: Literal["moma", "deepspeed"] = "moma"
    aux_routers: bool = False  # the auxiliary routers of causal inference (MoMa §2.4), one per MoE layer and group
    mod_capacity: float = 0.25  # "_mod" variants: share of each sequence's tokens a MoD layer keeps
    # Gumbel-sigmoid noise on the expert-choice router logits while training (the paper's, after
    # upcycling): logits + scale * Logistic(0, 1), over temperature, for both ranking and gate; 0: off.
    # Never at eval.
    router_noise: float = 0.0
    router_noise_temperature: float = 1.0

    def __post_init__(self) -> None:
        spec = parse_ffn(self.ffn)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension must be even (RoPE rotates pairs)")
        hints = typing.get_type_hints(ModelConfig)
        for f in dataclasses.fields(self):  # choices, also when built in code rather than parsed
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}; got {getattr(self, f.name)!r}")
        if spec.learned_routing and self.router == "token_choice":
            smallest = min(n for _, n in spec.groups)
            if not 1 <= self.token_choice_k <= smallest:
                raise ValueError(f"token_choice_k {self.token_choice_k} must be in [1, {smallest}] for {self.ffn}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {self.n_layers}"
                             + (" (a _mod variant needs at least one mixture-of-depths layer)" if spec.mod else ""))
        if self.router_noise < 0 or self.router_noise_temperature <= 0:
            raise ValueError(f"router_noise must be >= 0 and router_noise_temperature > 0, got "
                             f"{self.router_noise} and {self.router_noise_temperature}")
        if self.router_noise and not (spec.learned_routing and self.router == "expert_choice"
                                      and self.moe_dispatch == "moma"):
            raise ValueError(f"router_noise applies to expert-choice routers with moe_dispatch moma; {self.ffn} "
                             f"with {self.router} routing and moe_dispatch {self.moe_dispatch} has none")
        if spec.mod and not 0 < self.mod_capacity <= 1:
            raise ValueError(f"mod_capacity must lie in (0, 1], got {self.mod_capacity}")
        if self.capacity_factor <= 0:
            raise ValueError("capacity_factor must be > 0")
        if not 0 < self.image_offset <= self.vocab_size:
            raise ValueError(f"image_offset {self.image_offset} must lie in (0, vocab_size {self.vocab_size}]")

    @property
    def ffn_spec(self) -> FFNSpec:
        return parse_ffn(self.ffn)

    def is_mod_layer(self, layer: int) -> bool:
        """Mixture-of-depths layers: alternating, from layer 0 (the paper's placement)."""
        return self.ffn_spec.mod and layer % 2 == 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "model") -> ModelConfig:
        """Typed like every other config (unknown fields and wrong types name the field)."""
        from moma.pipeline.config_parsing import from_dict

        return from_dict(cls, data, where)


def swiglu_hidden(d_model: int, multiple: int = 256) -> int:
    """The SwiGLU hidden size with (about) the FLOPs of a 4·d two-matrix MLP: 8/3·d, rounded down to
    a multiple of 256 for the matmul kernels. The paper's size names count parameters with it: 90m,
    435m and 1.4b are 91.2 M, 423.7 M and 1.464 B dense parameters with a 65,536 vocabulary (4·d
    would give 101 M, 537 M and 1.88 B); tests/test_model.py checks each preset against its name."""
    return multiple * int(8 * d_model / 3 // multiple)


# Table 5 of the paper (layers / d_model / heads; SwiGLU hidden 8/3·d) plus a CPU-sized one, which
# keeps a 4·d hidden (no paper counterpart; the demo's measurements were made with it).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=4, d_model=128, ffn_hidden=512, n_heads=4, max_seq_len=512),
    "90m": dict(n_layers=8, d_model=512, ffn_hidden=swiglu_hidden(512), n_heads=8, max_seq_len=4096),
    "435m": dict(n_layers=24, d_model=1024, ffn_hidden=swiglu_hidden(1024), n_heads=16, max_seq_len=4096),
    "1.4b": dict(n_layers=24, d_model=2048, ffn_hidden=swiglu_hidden(2048), n_heads=16, max_seq_len=4096),
}
# Default vocabularies (text ranks + 16 controls, image codes) for `model info` when no tokenizers
# are given: a CPU-sized 4,096 + 1,024 for tiny (the demo's own tokenizers give 2,048 + 1,024 and
# training always takes the vocabulary from the tokenizers); Chameleon's 65,536 (of which 8,192
# image codes) for the paper's sizes.
DEFAULT_VOCAB = {"tiny": (4096, 1024), "90m": (57344, 8192), "435m": (57344, 8192), "1.4b": (57344, 8192)}
FFN_VARIANTS = ("dense", "moe_8x", "moma_1t1i", "moma_4t4i", "moma_4t4i_mod")


def preset(size: str, ffn: str = "moma_4t4i", vocab_size: int | None = None, image_offset: int | None = None,
           match_mod_depth: bool = True, **overrides: Any) -> ModelConfig:
    """A named size with an FFN variant; vocab defaults to the size's default text + image split.
    A mixture-of-depths variant ("_mod") is made FLOPs-equal to the model without MoD by adding
    layers, as the paper does (accounting.mod_matched_depth): its `n_layers` (the size's or the
    override) is then the depth it matches; `match_mod_depth=False` takes n_layers as given."""
    if size not in SIZES:
        raise ValueError(f"unknown model preset {size!r}; choose one of {sorted(SIZES)}")
    if vocab_size is None:
        text, image = DEFAULT_VOCAB[size]
        vocab_size, image_offset = text + image, text
    fields = {**SIZES[size], **overrides}
    cfg = ModelConfig(vocab_size=vocab_size, image_offset=image_offset if image_offset is not None else vocab_size,
                      ffn=ffn, **fields)
    if match_mod_depth and cfg.ffn_spec.mod:
        from moma.pipeline.model.accounting import mod_matched_depth

        cfg = dataclasses.replace(cfg, n_layers=mod_matched_depth(cfg))
    return cfg
