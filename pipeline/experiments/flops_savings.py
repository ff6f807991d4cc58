"""`moma experiment flops-savings`: the paper's headline measured here — how many fewer training FLOPs
a variant needs to reach dense's held-out loss, overall and by modality (MoMa Fig. 1 / §4).

    moma experiment flops-savings --data runs/demo/shards/captions@0.85 runs/demo/shards/text@0.15 \
        --eval-data runs/demo/shards/heldout --text-tokenizer runs/demo/tokenizers/text \
        --image-tokenizer runs/demo/tokenizers/image --scale cpu --out runs/flops_cpu

Method (the paper's, at our scale):
- every variant has the same width, depth and expert size, so expert choice at capacity factor 1
  spends the dense FLOPs per token (MoD spends fewer: its skipped blocks are counted, accounting.py);
  all runs see the same data order for a seed and the same schedule shape (warmup, linear decay to
  1 %), each through `moma train` under the deepspeed launcher;
- dense is trained to completion at several budgets (multiples of the variants' steps): its held-out
  loss against training FLOPs is a curve of finished runs, not points in the middle of a schedule;
- a variant's final held-out loss (all, text, image) is placed on that curve, linearly in log FLOPs;
  savings = dense FLOPs to reach it / the variant's FLOPs. Beyond dense's curve is extrapolated
  from its end segment and flagged, never silently reported;
- several seeds per point: a variant whose loss differs from dense-at-its-FLOPs by no more than the
  two seed spreads (half the range) together is reported as "no difference".

Resumable: each finished run leaves `runs/<name>/result.json` and is not redone; an unfinished one
resumes from its own checkpoint (`--resume auto`). Outputs: report.md, report.json and
loss_vs_flops_{all,text,image}.png in --out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moma.pipeline.config_parsing import ConfigError
from moma.pipeline.model.config import FFN_VARIANTS as VARIANTS

if TYPE_CHECKING:  # the loader imports torch: `moma --help` does not
    from moma.pipeline.loader.loader import DataSource
from moma.tokenizers.fileio import write_json_atomic

MODALITIES = ("all", "text", "image")
LOSS_KEY = {"all": "loss", "text": "loss_text", "image": "loss_image"}


def parse_variant(variant: str) -> tuple[str, dict[str, str]]:
    """`FFN[+field=value...]` -> (FFN variant, ModelConfig overrides as YAML strings): a variant of
    an ablation, e.g. `moma_4t4i+router_rank=softmax+router_assign=balanced`."""
    from moma.pipeline.model.config import parse_ffn

    ffn, *sets = variant.split("+")
    try:
        parse_ffn(ffn)
    except ValueError as e:
        raise ConfigError(f"--variants {variant!r}: {e}") from None
    overrides = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--variants {variant!r}: {item!r} is not field=value")
        overrides[key] = value
    return ffn, overrides


@dataclasses.dataclass(frozen=True)
class Scale:
    """One experiment size: the model shared by every variant, the token budget and the seeds."""

    preset: str
    model: dict[str, Any]  # ModelConfig overrides on the preset
    seq_len: int
    micro_batch: int  # sequences per rank per step
    steps: int  # the variants' budget; dense also runs at steps * each multiplier
    dense_multipliers: tuple[float, ...]
    warmup_steps: int
    lr: float
    eval_batches: int
    seeds: int
    ranks: int  # deepspeed --num_gpus
    checkpoint_every: int
    ds_config: str = "zero2_fp32"  # the DeepSpeed preset of every run
    log_every: int = 1  # metrics rows (and routing statistics) on every n-th step


SCALES: dict[str, Scale] = {
    # the machinery in a few minutes (the test suite): numbers mean nothing
    "smoke": Scale(preset="tiny", model=dict(d_model=64, n_layers=2, n_heads=2, ffn_hidden=128), seq_len=64,
                   micro_batch=2, steps=6, dense_multipliers=(0.5, 1, 2), warmup_steps=2, lr=3e-3, eval_batches=2,
                   seeds=1, ranks=2, checkpoint_every=4),
    # this 2-core machine in at most 90 minutes: the demo's tiny model (d 128, 4 layers), 4,096
    # tokens per step, 300 steps = 1.2 M tokens per variant run; dense up to 4x that
    "cpu": Scale(preset="tiny", model={}, seq_len=256, micro_batch=8, steps=300, dense_multipliers=(0.5, 1, 2, 4),
                 warmup_steps=30, lr=2e-3, eval_batches=16, seeds=2, ranks=2, checkpoint_every=150),
    # the ordering at 16 M tokens per run (2,000 steps of 8,192 tokens), the tiny width; about 20 min
    # per 1x run here, so the whole grid takes several hours: run it in the background (resumable)
    "cpu-long": Scale(preset="tiny", model={}, seq_len=256, micro_batch=16, steps=2000,
                      dense_multipliers=(0.5, 1, 2), warmup_steps=100, lr=2e-3, eval_batches=32, seeds=2, ranks=2,
                      checkpoint_every=500),
    # one H200 in under 4 minutes (jobs/gpu/flops_savings.sh states the arithmetic): a 90m-class width,
    # 200 steps of 16,384 tokens, bf16 (fp32 accumulation), statistics on logged steps only
    "gpu": Scale(preset="90m", model=dict(n_layers=4), seq_len=1024, micro_batch=16, steps=200,
                 dense_multipliers=(0.5, 1, 2), warmup_steps=20, lr=1e-3, eval_batches=16, seeds=1, ranks=1,
                 checkpoint_every=200, ds_config="zero2_bf16", log_every=25),
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    variant: str
    multiplier: float  # of the variants' budget (1 for every variant; dense also at the others)
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.variant}_x{self.multiplier:g}_s{self.seed}"


@dataclasses.dataclass(frozen=True)
class ExperimentInputs:
    data: tuple[DataSource, ...]
    eval_data: tuple[DataSource, ...]
    text_tokenizer: str
    image_tokenizer: str


def plan_runs(scale: Scale, variants: Sequence[str], seeds: int,
              variant_budgets: Sequence[float] = (1,), dense_budgets: Sequence[float] | None = None) -> list[RunSpec]:
    """Dense at every budget multiplier (the scale's, or `dense_budgets`; and every variant budget),
    each other variant at each of `variant_budgets` (default: 1x); every point at every seed."""
    dense = sorted({*(scale.dense_multipliers if dense_budgets is None else dense_budgets), *variant_budgets})
    runs = []
    for seed in range(seeds):
        runs += [RunSpec("dense", m, seed, max(1, round(scale.steps * m))) for m in dense]
        runs += [RunSpec(v, m, seed, max(1, round(scale.steps * m))) for m in variant_budgets
                 for v in variants if v != "dense"]
    return runs


def run_tree(scale: Scale, inputs: ExperimentInputs, run: RunSpec, out: Path,
             model_set: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `moma train` config of one run. `model_set`: ModelConfig overrides for every run of the
    experiment, dense included (e.g. block_norm=swin); a variant's own come after them."""
    from moma.pipeline.model.config import parse_ffn

    ffn, own = parse_variant(run.variant)
    spec = parse_ffn(ffn)
    experts = [n for _, n in spec.groups] if spec.learned_routing else []
    ep = 2 if experts and scale.ranks % 2 == 0 and all(n % 2 == 0 for n in experts) else 1
    return {
        "run_dir": str(out / "runs" / run.name), "seed": run.seed, "max_steps": run.steps,
        "data": {"sources": [{"path": s.path, "weight": s.weight} for s in inputs.data],
                 # weighted like training (shares of tokens), so "all" is the training mix's loss
                 "eval_sources": [{"path": s.path, "weight": s.weight} for s in inputs.eval_data],
                 "seq_len": scale.seq_len, "num_workers": 1, "shuffle_buffer": 500},
        "tokenizers": {"text": inputs.text_tokenizer, "image": inputs.image_tokenizer},
        "model": {"preset": scale.preset, "ffn": ffn,
                  "overrides": {**scale.model, **(model_set or {}), **{k: yaml.safe_load(v) for k, v in own.items()}}},
        "optim": {"lr": scale.lr},
        # the paper's schedule shape, over each run's own length: warmup, then linear decay to 1 %
        "schedule": {"warmup_steps": min(scale.warmup_steps, max(1, run.steps // 5)), "decay": "linear",
                     "min_lr_ratio": 0.01},
        "parallel": {"ds_config": scale.ds_config, "ep_size": ep, "micro_batch": scale.micro_batch, "grad_accum": 1},
        "checkpoint": {"every": scale.checkpoint_every, "keep": 1, "universal": "never"},
        "logging": {"every": scale.log_every, "progress_seconds": 30.0},
        "eval": {"every": run.steps, "batches": scale.eval_batches},  # once, on the finished model
    }


def _digest(tree: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def check_runs(trees: dict[str, dict[str, Any]], ranks: int) -> dict[str, Any]:
    """Every run's config planned before the first launch (bad data, tokenizers or layouts stop
    here); returns each run's ModelConfig."""
    from moma.pipeline.training.config import TrainConfig, from_dict
    from moma.pipeline.training.run_plan import plan_run

    models = {}
    for name, tree in trees.items():
        try:
            models[name] = plan_run(from_dict(TrainConfig, tree), ranks).model
        except ConfigError as e:
            raise ConfigError(f"run {name}: {e}") from None
    return models


def launch_run(tree: dict[str, Any], ranks: int, log: Path, label: str) -> None:
    """`moma train` under the deepspeed launcher; resumes the run's own checkpoint if it has one.
    Everything it prints goes to `log`; its progress and evaluation lines also to stdout, labelled."""
    from moma.pipeline.launch import deepspeed_command, free_port, launcher_env

    run_dir = Path(tree["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / "experiment_config.yaml"
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    cmd = deepspeed_command(ranks, "train", str(cfg), "--resume", "auto", master_port=free_port())
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launcher_env(), text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("train:", "step ", "resumed from")):
                print(f"{label} {line.rstrip()}", flush=True)
        code = proc.wait()
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"run {run_dir.name} failed (exit {code}); its log {log} ends:\n{tail}")


def collect_result(run_dir: Path, steps: int) -> dict[str, Any]:
    """The finished run's held-out loss by modality, tokens trained by modality and throughput."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    # a resumed run appends: the last record of a step is the one the final model wrote
    train = list({r["step"]: r for r in rows if "loss" in r}.values())
    evals = [r["eval"] for r in rows if "eval" in r and r["step"] == steps]
    if not evals or not train or train[-1]["step"] != steps:
        raise RuntimeError(f"{run_dir}: the run did not reach step {steps} with its held-out evaluation")
    speeds = [r["tokens_per_s"] for r in train[min(5, len(train) - 1):] if r.get("tokens_per_s")]
    return {"eval": {m: evals[-1][LOSS_KEY[m]] for m in MODALITIES}, "tokens": dict(train[-1]["tokens_seen"]),
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            # routing health at the end of training (rank 0's last logged micro-batch), per layer and group
            "routing": train[-1].get("routing") or {}}


# --- analysis ----------------------------------------------------------------------------------------

def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def dense_loss_at(curve: list[tuple[float, float]], flops: float) -> tuple[float, bool]:
    """Dense's loss at `flops` on its curve [(flops, loss)] sorted by flops, linear in log FLOPs;
    (loss, extrapolated)."""
    return _interp([(math.log(f), loss) for f, loss in curve], math.log(flops))


def _interp(points: list[tuple[float, float]], x: float) -> tuple[float, bool]:
    if len(points) == 1:
        return points[0][1], x != points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), False
    (x0, y0), (x1, y1) = (points[0], points[1]) if x < points[0][0] else (points[-2], points[-1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0), True


def dense_flops_to_reach(curve: list[tuple[float, float]], loss: float) -> tuple[float | None, bool]:
    """The FLOPs at which dense's curve reaches `loss`: (flops, extrapolated). Inside the curve, the
    first crossing; below its lowest loss (or above its highest), the end segment extended in log
    FLOPs, flagged; None when that segment does not descend (no estimate)."""
    pts = [(math.log(f), loss_) for f, loss_ in curve]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if min(y0, y1) <= loss <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (x1 - x0) * (loss - y0) / (y1 - y0)), False
    if len(pts) < 2:
        return None, True
    (x0, y0), (x1, y1) = (pts[-2], pts[-1]) if loss < min(y for _, y in pts) else (pts[0], pts[1])
    if y1 >= y0:
        return None, True
    return math.exp(x0 + (x1 - x0) * (loss - y0) / (y1 - y0)), True


def no_expert_share(routings: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Routing health of a point: per group, the share of its tokens no expert took at the end of
    training, averaged over layers and seeds ({} without learned routing)."""
    by_group: dict[str, list[float]] = {}
    for routing in routings:
        for key, shares in routing.items():
            by_group.setdefault(key.split(".", 1)[1], []).append(shares["0"])
    return {g: statistics.fmean(v) for g, v in sorted(by_group.items())}


def analyse(results: dict[str, dict[str, Any]], runs: list[RunSpec], models: dict[str, Any],
            seq_len: int) -> dict[str, Any]:
    """Seeds averaged per point, dense's curve per modality, each variant's savings on it."""
    from moma.pipeline.model.accounting import count

    points: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        res = dict(results[run.name])
        acc = count(models[run.name], seq_len)
        tokens = res["tokens"]
        res["flops"] = {"text": acc.flops_per_token["text"] * tokens["text"],
                        "image": acc.flops_per_token["image"] * tokens["image"]}
        res["flops"]["all"] = res["flops"]["text"] + res["flops"]["image"]
        res["accounting"] = acc
        points.setdefault((run.variant, run.multiplier), []).append(res)

    def summary(variant: str, mult: float) -> dict[str, Any]:
        rs = points[(variant, mult)]
        acc = rs[0]["accounting"]
        speeds = [r["tokens_per_s"] for r in rs if r["tokens_per_s"]]
        return {"variant": variant, "multiplier": mult, "seeds": len(rs),
                "params_total": acc.total_params,
                "params_active": acc.active_params,
                "flops_per_token": acc.flops_per_token,
                "flops": {m: statistics.fmean(r["flops"][m] for r in rs) for m in MODALITIES},
                "loss": {m: statistics.fmean(r["eval"][m] for r in rs) for m in MODALITIES},
                "loss_by_seed": {m: [r["eval"][m] for r in rs] for m in MODALITIES},
                "spread": {m: _spread([r["eval"][m] for r in rs]) for m in MODALITIES},
                "tokens_per_s": statistics.fmean(speeds) if speeds else None,
                "no_expert": no_expert_share([r.get("routing") or {} for r in rs])}

    dense = [summary("dense", m) for m in sorted({m for v, m in points if v == "dense"})]
    curves = {m: sorted((p["flops"][m], p["loss"][m]) for p in dense) for m in MODALITIES}
    spreads = {m: sorted((p["flops"][m], p["spread"][m]) for p in dense) for m in MODALITIES}
    variants = []
    budgets = sorted({r.multiplier for r in runs if r.variant != "dense"} or {1})
    for variant, mult in ((v, m) for m in budgets for v in dict.fromkeys(r.variant for r in runs)):
        if (variant, mult) not in points:
            continue
        s = summary(variant, mult)
        s["savings"] = {}
        for m in MODALITIES:
            reach, extrapolated = dense_flops_to_reach(curves[m], s["loss"][m])
            at, _ = dense_loss_at(curves[m], s["flops"][m])
            dense_spread, _ = dense_loss_at(spreads[m], s["flops"][m])
            diff = at - s["loss"][m]  # > 0: the variant is ahead of dense at its own FLOPs
            s["savings"][m] = {
                "factor": reach / s["flops"][m] if reach else None,
                "extrapolated": extrapolated,
                "dense_loss_at_same_flops": at,
                "loss_gain": diff,
                # only with seeds to measure the spread by: one seed never claims "no difference"
                "no_difference": s["seeds"] > 1 and abs(diff) <= s["spread"][m] + dense_spread,
            }
        variants.append(s)
    return {"dense_curve": dense, "variants": variants}


# --- the report --------------------------------------------------------------------------------------

def _m(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _saving(s: dict[str, Any]) -> str:
    if s["no_difference"]:
        return "no difference"
    if s["factor"] is None:
        return "n/a (beyond dense's curve)"
    return f"{s['factor']:.2f}x" + (" (extrapolated)" if s["extrapolated"] else "")


def _share(shares: dict[str, float]) -> str:
    return " / ".join(f"{g} {v:.2f}" for g, v in shares.items()) or "-"


def _loss(s: dict[str, Any], m: str) -> str:
    return f"{s['loss'][m]:.4f}" + (f" ± {s['spread'][m]:.4f}" if s["seeds"] > 1 else "")


def report_markdown(analysis: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# FLOPs savings over dense — scale `{meta['scale']}`", "",
             f"{meta['seeds']} seed(s) per point; {meta['steps']} steps of {meta['tokens_per_step']:,} tokens per "
             f"variant run (x{', x'.join(f'{m:g}' for m in meta['variant_budgets'])}); dense at "
             f"{', '.join(f'{m:g}x' for m in meta['dense_multipliers'])} of that. Held-out "
             f"loss in nats/token ({meta['eval_batches']} batches of the eval shards, mean ± half the seed range). "
             "Savings: dense FLOPs to reach the variant's loss / the variant's FLOPs, interpolated in log FLOPs "
             "on dense's finished runs; \"no difference\": inside the seed spreads.", "",
             "No-expert share: the share of a group's tokens that no expert took (routing health, mean over "
             "layers, end of training; 0.32 is independent random routers' at 4 experts).", "",
             "| variant | params total | active (text / image) | GFLOPs/token (text / image) | loss text "
             "| loss image | loss all | savings text | savings image | savings all | no-expert share | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in analysis["variants"]:
        a, f = s["params_active"], s["flops_per_token"]
        label = s["variant"] if s["multiplier"] == 1 else f"{s['variant']} ({s['multiplier']:g}x budget)"
        lines.append(
            f"| {label} | {_m(s['params_total'])} | {_m(a['text'])} / {_m(a['image'])} | "
            f"{f['text'] / 1e9:.4f} / {f['image'] / 1e9:.4f} | {_loss(s, 'text')} | {_loss(s, 'image')} | "
            f"{_loss(s, 'all')} | {_saving(s['savings']['text'])} | {_saving(s['savings']['image'])} | "
            f"{_saving(s['savings']['all'])} | {_share(s.get('no_expert') or {})} | {s['tokens_per_s'] or 0:,.0f} |")
    lines += ["", "Dense's curve (finished runs):", "",
              "| budget | training FLOPs | loss all | loss text | loss image |", "|---|---|---|---|---|"]
    for p in analysis["dense_curve"]:
        lines.append(f"| {p['multiplier']:g}x | {p['flops']['all']:.3e} | {_loss(p, 'all')} | "
                     f"{_loss(p, 'text')} | {_loss(p, 'image')} |")
    lines += ["", "The paper (1.4B, 1T tokens; Lin et al. 2024, Fig. 1 / Table 2): moma_4t4i 3.7x overall, "
              "2.6x text, 5.2x image; moe_8x 3.0x overall; moma_4t4i_mod 4.2x overall.", "",
              f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def plot(analysis: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for m in MODALITIES:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        dense = analysis["dense_curve"]
        ax.plot([p["flops"][m] for p in dense], [p["loss"][m] for p in dense], "o-", color="black", label="dense")
        for p in dense:
            for loss in p["loss_by_seed"][m]:
                ax.plot(p["flops"][m], loss, ".", color="grey")
        for s in analysis["variants"]:
            if s["variant"] == "dense":
                continue
            label = s["variant"] if s["multiplier"] == 1 else f"{s['variant']} ({s['multiplier']:g}x)"
            ax.errorbar([s["flops"][m]], [s["loss"][m]], yerr=[s["spread"][m]], fmt="s", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"training FLOPs ({m} tokens)" if m != "all" else "training FLOPs")
        ax.set_ylabel(f"held-out loss ({m})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"loss_vs_flops_{m}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


# --- the command -------------------------------------------------------------------------------------

def run_experiment(inputs: ExperimentInputs, scale_name: str, out: str | Path, variants: Sequence[str] = VARIANTS,
                   seeds: int | None = None, command: str = "", variant_budgets: Sequence[float] = (1,),
                   dense_budgets: Sequence[float] | None = None, model_set: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Every run (planned and checked first), then the analysis, report.md/json and the plots.
    `variant_budgets`: multiples of the scale's steps each variant trains at (dense runs at each too);
    `dense_budgets`: dense's own multiples (default: the scale's); `model_set`: ModelConfig overrides
    of every run (an ablation of an architecture choice keeps dense's curve under the same choice).
    Variants may carry their own overrides: `moma_4t4i+router_rank=softmax`."""
    if scale_name not in SCALES:
        raise ConfigError(f"--scale must be one of {sorted(SCALES)}, got {scale_name!r}")
    scale = SCALES[scale_name]
    for v in variants:
        parse_variant(v)
    if "dense" not in variants:
        variants = ["dense", *variants]  # the baseline every saving is measured against
    seeds = scale.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if not variant_budgets or any(m <= 0 for m in variant_budgets):
        raise ConfigError(f"--variant-budgets must be positive multiples of the scale's steps, got {variant_budgets}")
    if dense_budgets is not None and (not dense_budgets or any(m <= 0 for m in dense_budgets)):
        raise ConfigError(f"--dense-budgets must be positive multiples of the scale's steps, got {dense_budgets}")
    if not inputs.eval_data:
        raise ConfigError("--eval-data is required: savings are measured on held-out loss")
    out = Path(out).resolve()
    runs = plan_runs(scale, variants, seeds, variant_budgets, dense_budgets)
    trees = {r.name: run_tree(scale, inputs, r, out, model_set) for r in runs}
    models = check_runs(trees, scale.ranks)  # every config error before the first launch
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        tree, run_dir = trees[run.name], out / "runs" / run.name
        marker = run_dir / "result.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            if done["config_digest"] != _digest(tree):
                raise ConfigError(f"{run_dir} holds a finished run with other settings (another scale, data or "
                                  f"tokenizers?): use another --out, or delete that run")
            results[run.name] = done
            print(f"[{i}/{len(runs)}] {run.name}: done before, kept", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[{i}/{len(runs)}] {run.name}: {run.steps} steps ...", flush=True)
        launch_run(tree, scale.ranks, run_dir / "launch.log", f"[{i}/{len(runs)}] {run.name}:")
        res = {**collect_result(run_dir, run.steps), "config_digest": _digest(tree), "steps": run.steps,
               "seconds": round(time.perf_counter() - t0, 1)}
        write_json_atomic(marker, res)
        results[run.name] = res
        ev = res["eval"]
        print(f"[{i}/{len(runs)}] {run.name}: held-out all {ev['all']:.4f}, text {ev['text']:.4f}, image "
              f"{ev['image']:.4f} in {res['seconds']:.0f} s (elapsed {(time.perf_counter() - start) / 60:.1f} min)",
              flush=True)
    analysis = analyse(results, runs, models, scale.seq_len)
    meta = {"scale": scale_name, "seeds": seeds, "steps": scale.steps, "model_set": model_set or {},
            "dense_multipliers": sorted({r.multiplier for r in runs if r.variant == "dense"}),
            "variant_budgets": list(variant_budgets),
            "tokens_per_step": scale.seq_len * scale.micro_batch * scale.ranks, "eval_batches": scale.eval_batches,
            "scale_settings": dataclasses.asdict(scale), "command": command,
            "minutes": round((time.perf_counter() - start) / 60, 1)}
    report = {"meta": meta, **analysis}
    write_json_atomic(out / "report.json", report)
    from moma.tokenizers.fileio import atomic_write

    with atomic_write(out / "report.md", "w") as f:
        f.write(report_markdown(analysis, meta))
    plot(analysis, out)
    print(report_markdown(analysis, meta))
    print(f"flops-savings ({scale_name}): {len(runs)} runs in {meta['minutes']} min; report {out / 'report.md'}")
    return report
