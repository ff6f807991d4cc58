"""`moma demo`: the whole pipeline on embedded data, on this machine, end to end.

    moma demo --out runs/demo

1. data        a generated corpus of pictures whose captions describe them exactly (synthetic.py)
               and the embedded Shakespeare plays (text-only documents)
2. tokenizers  byte-level BPE on the plays + captions; the tiny VQ image tokenizer on the pictures
3. shards      captions (image-first or text-first, per document) and text, --workers 2
4. train       moma_4t4i tiny with the deepspeed launcher on 2 ranks (CPU: gloo), ZeRO-2, expert
               parallel 2: train, checkpoint, stop; resume from the checkpoint, finish (held-out loss
               by modality every 60 steps, on pictures the model never trains on)
5. report      per-modality losses, loss plot, exported weights
6. causal      the auxiliary routers fitted to the trained model's expert choices (main model
               frozen, 2 ranks); held-out loss under expert choice vs causal routing; a caption for
               a held-out picture and a picture for a held-out caption (PNG); last line `run dir: PATH`
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from moma.pipeline.launch import deepspeed_command, launcher_env
from moma.pipeline.synthetic import write_folder_corpus


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _plays() -> list[str]:
    root = Path(str(importlib.resources.files("moma.pipeline") / "assets" / "text"))
    return sorted(str(p) for p in root.glob("*.txt"))


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _moma(*args: str) -> list[str]:
    return [sys.executable, "-m", "moma.pipeline.cli", *args]


DEMO_CONFIG = "demo_tiny.yaml"  # jobs/configs/demo_tiny.yaml: the one definition of the demo's run
DEMO_ROOT = "runs/demo"  # the root its paths are written against


def demo_config(out: Path, steps: int) -> dict[str, Any]:
    """The shipped demo config with its paths moved from runs/demo to `out` and `steps` steps."""
    tree = yaml.safe_load((importlib.resources.files("moma.configs") / DEMO_CONFIG).read_text())

    def rebase(path: str) -> str:
        rel = Path(path).relative_to(DEMO_ROOT)
        return str(out / rel)

    tree["run_dir"] = rebase(tree["run_dir"])
    for source in tree["data"]["sources"]:
        source["path"] = rebase(source["path"])
    for source in tree["data"].get("eval_sources", []):
        source["path"] = rebase(source["path"])
    tree["tokenizers"] = {k: rebase(v) for k, v in tree["tokenizers"].items()}
    tree["max_steps"] = steps
    return tree


def run_demo(out: str | Path, images: int = 3000, image_minutes: float = 2.5, steps: int = 240,
             ranks: int = 2) -> Path:
    out = Path(out).resolve()
    start = time.perf_counter()
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # a fresh training run each time; data and tokenizers are reused

    _say("1/6 data: generated captioned pictures + embedded Shakespeare")
    shapes, heldout = out / "data" / "shapes", out / "data" / "heldout"
    if not (shapes / "README.json").exists():
        write_folder_corpus(shapes, images, seed=0, size=64)
    if not (heldout / "README.json").exists():
        write_folder_corpus(heldout, 200, seed=12345, size=64)  # other pictures: never trained on
    print(f"{images} pictures with exact captions in {shapes} (+200 held out); {len(_plays())} plays (public domain)")

    _say("2/6 tokenizers: BPE on the plays + captions, tiny VQ on the pictures")
    tok = out / "tokenizers"
    if not (tok / "text" / "ranks.tiktoken").exists():
        _run(_moma("tokenizer", "train-text", "--input", *_plays(), str(shapes / "*.txt"), "--vocab-size", "2048",
                   "--out", str(tok / "text"), "--name", "demo-bpe-2048"))
    if not (tok / "image" / "image_tokenizer.json").exists():
        # flat synthetic pictures train best at a lower learning rate than photos (see vq_train.py)
        _run(_moma("tokenizer", "train-image", "--images", str(shapes), "--preset", "tiny", "--max-minutes",
                   str(image_minutes), "--lr", "3e-4", "--batch-size", "16", "--out", str(tok / "image")))
    _run(_moma("tokenizer", "eval-image", "--tokenizer", str(tok / "image"), "--images",
               *[str(p) for p in sorted(shapes.glob("*.png"))[-64:]], "--grid", str(out / "vq_recon.png")))

    _say("3/6 shards: captions in both orders, plays as text-only documents, held-out captions")
    for name, source, extra in (("captions", f"folder:{shapes}", ["--order", "random"]),
                                ("text", "text:" + str(Path(_plays()[0]).parent / "*.txt"), []),
                                ("heldout", f"folder:{heldout}", ["--order", "random"])):
        if not (out / "shards" / name / "manifest.json").exists():
            _run(_moma("shards", "build", "--source", source, "--text-tokenizer", str(tok / "text"),
                       "--image-tokenizer", str(tok / "image"), "--out", str(out / "shards" / name), "--workers", "2",
                       "--num-partitions", "4", *extra))

    _say(f"4/6 train moma_4t4i tiny: deepspeed launcher, {ranks} ranks, ZeRO-2, expert parallel 2")
    cfg_path = out / "demo_config.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_config(out, steps), sort_keys=False))
    _run(_moma("train", str(cfg_path), "--check", "--world-size", str(ranks)))
    launch = deepspeed_command(ranks, "train", str(cfg_path))
    half = steps // 2
    print(f"-- phase 1: steps 1-{half}, checkpoint, stop")
    _run(launch + [f"stop_at_step={half}", "--resume", "auto"], env=launcher_env())
    print(f"-- phase 2: resume from the step-{half} checkpoint, steps {half + 1}-{steps}")
    _run(launch + ["--resume", "auto"], env=launcher_env())

    _say("5/6 report")
    run_dir = out / "run"
    _run(_moma("plot", str(run_dir)))
    _run(_moma("export", str(run_dir / "checkpoints"), "--out", str(run_dir / "export")))
    print(summarize(run_dir))

    _say("6/6 causal inference: auxiliary routers, held-out loss EC vs causal, a caption and a picture")
    aux = run_dir / "aux_routers"
    shards = out / "shards"
    _run(deepspeed_command(ranks, "train-aux-routers", "--from", str(run_dir / "checkpoints"), "--data",
                           f"{shards / 'captions'}@0.85", f"{shards / 'text'}@0.15", "--eval-data",
                           str(shards / "heldout"), "--steps", "60", "--out", str(aux), "optim.lr=0.003"),
         env=launcher_env())
    causal = run_dir / "export_causal"
    _run(_moma("export", str(aux / "checkpoints"), "--out", str(causal)))
    print(causal_report(out, run_dir, causal))
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
    print(f"run dir: {run_dir}")
    return run_dir


def causal_report(out: Path, run_dir: Path, causal: Path) -> str:
    """Held-out loss under both routings, a caption for a held-out picture, a picture for a held-out caption."""
    def moma_json(*args: str) -> dict[str, Any]:
        proc = subprocess.run(_moma(*args), check=True, capture_output=True, text=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    heldout = out / "data" / "heldout"
    loss = {r: moma_json("eval", str(causal), "--data", str(out / "shards" / "heldout"), "--routing", r,
                         "--batches", "16") for r in ("ec", "causal")}
    picture = sorted(heldout.glob("*.png"))[0]
    caption = moma_json("generate", "--model", str(causal), "--image", str(picture), "--temperature", "0",
                        "--max-new-tokens", "40")
    drawn_for = sorted(heldout.glob("*.txt"))[1]
    png = run_dir / "generated.png"
    moma_json("generate", "--model", str(causal), "--prompt", drawn_for.read_text().strip(), "--generate-image",
              "--image-out", str(png), "--cfg-scale", "3", "--seed", "1")
    lines = ["held-out loss (nats/token; 16 batches of pictures never trained on), expert choice vs causal routing:",
             *(f"  {r:6}: all {v['loss']:.3f}, text {v['loss_text']:.3f}, image {v['loss_image']:.3f}"
               for r, v in loss.items()),
             f"caption for held-out {picture.name}: {caption['text']!r}",
             f"  its true caption:    {picture.with_suffix('.txt').read_text().strip()!r}",
             f"picture for held-out caption {drawn_for.read_text().strip()!r}: {png}"]
    return "\n".join(lines)


def summarize(run_dir: Path) -> str:
    from moma.pipeline.training.metrics import read_metrics

    rows = read_metrics(run_dir)

    def avg(key: str, part: list[dict[str, Any]]) -> str:
        vals = [r[key] for r in part if r.get(key) is not None]
        return f"{sum(vals) / len(vals):.3f}" if vals else "-"

    first, last = rows[:10], rows[-10:]
    lines = ["per-modality training loss (nats/token, mean of 10 steps):",
             *(f"  steps {part[0]['step']}-{part[-1]['step']}: all {avg('loss', part)}, "
               f"text {avg('loss_text', part)}, image {avg('loss_image', part)}" for part in (first, last)),
             f"  tokens seen: {json.dumps(rows[-1]['tokens_seen'])}; skipped non-finite steps: "
             f"{rows[-1]['nonfinite_skipped']}; bad data: {rows[-1]['bad_data'] or 'none'}",
             f"  expert load at the end: {json.dumps(rows[-1]['expert_load'])}",
             *routing_health_lines(rows)]
    return "\n".join(lines)


def routing_health_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The share of each group's tokens no expert took, at the first and the last logged step (mean
    over layers): the figure that shows expert choice collapsing, or not."""
    def share(row: dict[str, Any]) -> str:
        groups: dict[str, list[float]] = {}
        for key, v in (row.get("routing") or {}).items():
            groups.setdefault(key.split(".", 1)[1], []).append(v["0"])
        return ", ".join(f"{g} {sum(v) / len(v):.2f}" for g, v in sorted(groups.items()))

    if not rows or not rows[-1].get("routing"):
        return []
    return [f"  routing health, tokens no expert took: step {rows[0]['step']}: {share(rows[0])}; "
            f"step {rows[-1]['step']}: {share(rows[-1])}"]
