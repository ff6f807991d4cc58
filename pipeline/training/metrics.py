"""Per-step metrics on rank 0: metrics.jsonl always, TensorBoard optionally, and `moma plot`.

    moma plot runs/demo          # -> runs/demo/plots/loss.png (loss by modality vs step)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from moma.pipeline.model.transformer import Transformer


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("logging.tensorboard: tensorboard is not installed (pip install 'moma[tensorboard]'); "
                      "metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in _flatten(row).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def expert_load(model: Transformer) -> dict[str, dict[str, float]]:
    """Per modality group, averaged over layers (this rank's last micro-batch): tokens per expert
    (mean and max/mean), share of the group's tokens picked by 0 / 1 / 2+ experts, router entropy."""
    groups: dict[str, list[dict[str, torch.Tensor]]] = {}
    for key, gate in model.moe_gates().items():
        if gate.last_stats:
            groups.setdefault(key.split(".", 1)[1], []).append(gate.last_stats)
    out = {}
    for group, stats in groups.items():
        counts = torch.stack([s["tokens_per_expert"].float() for s in stats])
        mean = counts.mean(dim=1).clamp(min=1e-9)
        out[group] = {
            "tokens_per_expert": round(float(mean.mean()), 2),
            "max_over_mean": round(float((counts.max(dim=1).values / mean).mean()), 3),
            **{k: round(float(torch.stack([s[k] for s in stats]).float().mean()), 4)
               for k in ("picked_0", "picked_1", "picked_2plus", "router_entropy")},
        }
    return out


def routing_health(model: Transformer) -> dict[str, dict[str, float]]:
    """Per MoE layer and group ("layer.group"), this rank's last logged micro-batch: the share of the
    group's tokens taken by no expert ("0"), one ("1") and two or more ("2+"). Expert choice at
    capacity factor 1 gives every token one expert on average; a growing "0" share means the experts
    pick the same tokens (docs/design.md, routing health)."""
    return {key: {"0": round(float(gate.last_stats["picked_0"]), 4), "1": round(float(gate.last_stats["picked_1"]), 4),
                  "2+": round(float(gate.last_stats["picked_2plus"]), 4)}
            for key, gate in model.moe_gates().items() if gate.last_stats}


def no_expert_warning(health: dict[str, dict[str, float]], threshold: float) -> str | None:
    """A one-line warning naming the layers and groups whose no-expert share passes `threshold`."""
    bad = {k: v["0"] for k, v in health.items() if v["0"] > threshold}
    if not bad:
        return None
    worst = ", ".join(f"{k} {v:.2f}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:4])
    return (f"routing: {len(bad)} of {len(health)} layer groups leave more than {threshold:.0%} of their tokens "
            f"to no expert ({worst}): the experts pick the same tokens; try model.overrides.router_rank=softmax "
            f"or router_assign=balanced")


class RoutingHealthTotals:
    """`routing_health` token-weighted over many forwards (`moma eval`'s whole held-out set): call
    `add()` after each forward made with routing statistics on."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.sums: dict[str, list[float]] = {}  # key -> [tokens, no expert, one, two or more]

    def add(self) -> None:
        for key, gate in self.model.moe_gates().items():
            stats, gate.last_stats = gate.last_stats, {}  # consumed: a layer with no statistics adds nothing
            if stats:
                n = float(stats["tokens"])
                acc = self.sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])
                for i, v in enumerate((1.0, stats["picked_0"], stats["picked_1"], stats["picked_2plus"])):
                    acc[i] += n * float(v)

    def shares(self) -> dict[str, dict[str, float]]:
        return {key: {"0": round(a[1] / a[0], 4), "1": round(a[2] / a[0], 4), "2+": round(a[3] / a[0], 4)}
                for key, a in self.sums.items() if a[0]}


class RoutingWatch:
    """`no_expert_warning` at most once every `every` steps (statistics are logged every step in
    short runs; the warning is for a person reading the log)."""

    def __init__(self, threshold: float, every: int = 100) -> None:
        self.threshold, self.every = threshold, every
        self.last: int | None = None

    def check(self, step: int, health: dict[str, dict[str, float]]) -> str | None:
        if self.threshold >= 1 or (self.last is not None and step - self.last < self.every):
            return None
        message = no_expert_warning(health, self.threshold)
        if message:
            self.last = step
            return f"step {step}: {message}"
        return None


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a resumed run appends; keep the last record of each step (the one the final model saw)
    by_step = {r["step"]: r for r in rows if "step" in r and "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no training steps")
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "all"), ("loss_text", "text"), ("loss_image", "image")):
        values = [r.get(key) for r in rows]
        if any(v is not None and math.isfinite(v) for v in values):
            axes[0].plot(steps, [v if v is not None else float("nan") for v in values], label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[0].set_title("training loss by modality")
    axes[0].legend()
    axes[1].plot(steps, [r.get("lr", float("nan")) for r in rows])
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    return _save_figure(fig, run_dir / "plots" / "loss.png")


def _save_figure(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_eval_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The held-out rows of metrics.jsonl (`eval`, and `eval_causal` once the model has auxiliary
    routers), the last record of each step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "step" in row and ("eval" in row or "eval_causal" in row):
                by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_heldout(run_dir: str | Path) -> Path | None:
    """plots/heldout.png: held-out loss by modality vs step, expert choice solid and causal routing
    dashed (when the run evaluated both); None when the run has no held-out rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_eval_rows(run_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"loss": "black", "loss_text": "tab:blue", "loss_image": "tab:orange"}
    for routing, style, name in (("eval", "-", "expert choice"), ("eval_causal", "--", "causal")):
        points = [(r["step"], r[routing]) for r in rows if routing in r]
        for key, label in (("loss", "all"), ("loss_text", "text"), ("loss_image", "image")):
            xy = [(s, e[key]) for s, e in points if e.get(key) is not None and math.isfinite(e[key])]
            if xy:
                ax.plot(*zip(*xy), style, marker="o", markersize=3, color=colors[key], label=f"{label}, {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("held-out loss by modality")
    ax.legend(fontsize=8)
    return _save_figure(fig, run_dir / "plots" / "heldout.png")


def check_logging(logging_cfg: Any) -> None:
    """Refuse, before anything launches, a logger whose package is missing (`moma train --check`
    runs this; training used to print a line after launch and go on without it)."""
    import importlib.util

    if logging_cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("logging.tensorboard: the tensorboard package is not installed: pip install "
                         "'moma[tensorboard]' (jobs/setup.sh installs it), or set logging.tensorboard=false")
