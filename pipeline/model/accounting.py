"""Parameter and FLOP accounting from the config alone (the basis of MFU and FLOPs-savings figures).

Conventions:
* total parameters: every tensor, all experts, padded embedding rows included;
* active parameters per token (by modality): what one token of that modality multiplies with on
  average: attention, norms, its group's router and capacity_factor x one expert (expert choice
  with capacity factor c processes c tokens per token on average; token choice k x c at most,
  counted as k), plus the output head; the embedding lookup is not a multiply and is excluded;
* training FLOPs per token: 6 x active matmul parameters (forward 2, backward 4) plus attention
  scores and values, 12 x layers x d_model x seq_len (PaLM's MFU convention, no causal discount);
* mixture-of-depths ("_mod"): a MoD layer's block counts mod_capacity of a token (its kept share), its
  attention mod_capacity^2 (kept tokens over kept keys), its router d parameters for every token.

    moma model info --preset tiny --ffn moma_4t4i
"""

from __future__ import annotations

import dataclasses

from moma.pipeline.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Accounting:
    total_params: int
    embedding_params: int
    expert_params: int  # all experts of all layers
    active_params: dict[str, int]  # per token, by modality
    flops_per_token: dict[str, int]  # training (fwd + bwd), by modality
    seq_len: int

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _swiglu(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.ffn_hidden


def count(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    d, layers = cfg.d_model, cfg.n_layers
    seq = seq_len or cfg.max_seq_len
    spec = cfg.ffn_spec
    attn = 4 * d * d + (2 * cfg.head_dim if cfg.qk_norm else 0)
    norms = 2 * d  # attention_norm, ffn_norm
    embed = cfg.padded_vocab * d
    head = cfg.padded_vocab * d + d  # output projection + final norm

    if spec.kind == "dense":
        ffn_total, experts = _swiglu(cfg), 0
        ffn_active = {"text": _swiglu(cfg), "image": _swiglu(cfg)}
    elif not spec.learned_routing:  # moma_1t1i
        ffn_total, experts = 2 * _swiglu(cfg), 0
        ffn_active = {"text": _swiglu(cfg), "image": _swiglu(cfg)}
    else:
        groups = dict(spec.groups)
        experts = sum(groups.values()) * _swiglu(cfg)
        ffn_total = experts + sum(n * d for n in groups.values())  # + routers
        per_token = cfg.capacity_factor if cfg.router == "expert_choice" else cfg.token_choice_k
        ffn_active = {}
        for modality in ("text", "image"):
            n = groups.get(modality, groups.get("all"))
            ffn_active[modality] = round(per_token * _swiglu(cfg)) + n * d
    # mixture-of-depths: a MoD layer runs its block on mod_capacity of the tokens (plus its router, d
    # parameters, for every token); its attention spans the kept tokens only
    mod_layers = sum(cfg.is_mod_layer(i) for i in range(layers))
    c = cfg.mod_capacity if mod_layers else 1.0
    block_share = (layers - mod_layers) + mod_layers * c  # layers' worth of block work per token
    total = embed + head + layers * (attn + norms + ffn_total) + mod_layers * d
    active = {m: round(block_share * (attn + norms + ffn_active[m])) + mod_layers * d + head for m in ("text", "image")}
    attention_flops = round(12 * d * seq * ((layers - mod_layers) + mod_layers * c * c))
    flops = {m: 6 * active[m] + attention_flops for m in active}
    return Accounting(total_params=total, embedding_params=embed, expert_params=layers * experts,
                      active_params=active, flops_per_token=flops, seq_len=seq)


def describe(cfg: ModelConfig, acc: Accounting) -> str:
    def m(n: float) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    spec = cfg.ffn_spec
    groups = ", ".join(f"{g}: {n}" for g, n in spec.groups) or "-"
    lines = [
        f"layers {cfg.n_layers}, d_model {cfg.d_model}, heads {cfg.n_heads}, ffn hidden {cfg.ffn_hidden}, "
        f"vocab {cfg.vocab_size} (image codes from {cfg.image_offset}), seq {acc.seq_len}",
        f"ffn {cfg.ffn} (expert groups {groups}; router {cfg.router if spec.learned_routing else 'modality only'}"
        f"{', capacity factor ' + str(cfg.capacity_factor) if spec.learned_routing else ''})",
        f"parameters: total {m(acc.total_params)} (embedding {m(acc.embedding_params)}, experts "
        f"{m(acc.expert_params)})",
        f"active per token: text {m(acc.active_params['text'])}, image {m(acc.active_params['image'])}",
        f"training FLOPs per token: text {acc.flops_per_token['text'] / 1e9:.3f} GFLOP, "
        f"image {acc.flops_per_token['image'] / 1e9:.3f} GFLOP",
    ]
    return "\n".join(lines)


def mod_matched_depth(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """The depth at which a mixture-of-depths variant spends the FLOPs per token of the same model
    without MoD at `cfg.n_layers` (the paper's Table 1 adds layers: 90m 8 -> 14, 435m 24 -> 40; 1.4b
    24 -> 40 here, within 2 %). Even depths only (a MoD layer and a full one per pair), the nearest in
    FLOPs; at the tiny width the output head makes one pair 20 % of the FLOPs, so no depth is within 2 %."""
    if not cfg.ffn_spec.mod:
        return cfg.n_layers
    plain = dataclasses.replace(cfg, ffn=cfg.ffn.removesuffix("_mod"))
    target = count(plain, seq_len).flops_per_token["text"]

    def gap(n: int) -> float:
        return abs(count(dataclasses.replace(cfg, n_layers=n), seq_len).flops_per_token["text"] / target - 1)

    return min(range(2, 4 * cfg.n_layers + 3, 2), key=lambda n: (gap(n), n))
