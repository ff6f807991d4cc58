"""The `moma` command: one entry point for every stage.

    moma --help
    moma tokenizer train-text --input corpus/ --vocab-size 8192 --out runs/tok/text

Subcommand handlers import their heavy dependencies (torch, deepspeed) lazily so that `--help`
and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from moma.pipeline.cli_options import add_options, options_from
from moma.pipeline.errors import MomaError

Handler = Callable[[argparse.Namespace], int]


def _tokenizer_commands(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train, inspect and apply the text BPE and the image VQ tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_cmd", required=True, metavar="COMMAND")

    p = tsub.add_parser("train-text", help="train byte-level BPE ranks (.tiktoken) on a text corpus")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt/.jsonl, .gz ok)")
    p.add_argument("--vocab-size", type=int, required=True, help="ranks + 16 control tokens (>= 272)")
    p.add_argument("--out", required=True, help="output directory (ranks.tiktoken, tokenizer.json)")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--pattern", default=None, help="pre-tokenisation regex or a name (cl100k_base, o200k_base, gpt2)")
    p.add_argument("--name", default=None, help="label recorded in the tokenizer identity")
    p.set_defaults(func=_cmd_train_text)

    p = tsub.add_parser("show", help="print a tokenizer's identity, vocabulary layout and a sample encoding")
    p.add_argument("path", help="moma tokenizer dir, .tiktoken file, or GPT-2 encoder.json/vocab.bpe dir")
    p.add_argument("--pattern", default=None, help="pattern for a non-official .tiktoken file without sidecar")
    p.add_argument("--text", default="To be, or not to be: that is the question. <|boi|> is plain text here.")
    p.set_defaults(func=_cmd_show_text)

    p = tsub.add_parser("train-image", help="train the image VQ tokenizer (resumable; DDP under torchrun)")
    p.add_argument("--images", nargs="+", required=True,
                   help="image directories, list files (.txt) or images; KIND:PATH for a shard source")
    p.add_argument("--preset", default="tiny", help="tiny | base | chameleon")
    p.add_argument("--quantizer", choices=["vq", "fsq"], default=None, help="override the preset's quantizer")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="end cleanly (final checkpoint) after this")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-images", nargs="*", default=[], help="images for the reconstruction grids")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="architecture overrides, e.g. ch=32 codebook_size=4096")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_train_image)

    p = tsub.add_parser("encode-image", help="one image -> codes.npy (uint32, raster order)")
    p.add_argument("image")
    p.add_argument("--tokenizer", required=True, help="train-image --out dir, checkpoint, or vqgan.ckpt")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_encode_image)

    p = tsub.add_parser("decode-image", help="codes.npy -> image PNG")
    p.add_argument("codes")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_decode_image)

    p = tsub.add_parser("eval-image", help="PSNR/SSIM/codebook usage on images vs the bicubic baseline")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--grid", default=None, help="write originals / reconstructions / baseline as a PNG")
    p.set_defaults(func=_cmd_eval_image)


def _cmd_train_text(args: argparse.Namespace) -> int:
    from moma.tokenizers.bpe_train import train_bpe

    tok, report = train_bpe(args.input, args.vocab_size, args.out, field=args.field, pattern=args.pattern,
                            name=args.name)
    for problem in report.stats.first_problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(report.summary())
    print(f"wrote {args.out}/ranks.tiktoken sha256 {tok.identity.sha256}")
    return 0


def _cmd_show_text(args: argparse.Namespace) -> int:
    from moma.tokenizers.text import TextTokenizer

    tok = TextTokenizer.load(args.path, pattern=args.pattern)
    print(show_text_tokenizer(tok, args.text))
    return 0


def show_text_tokenizer(tok: TextTokenizer, sample: str) -> str:  # noqa: F821 (lazy import)
    ids = tok.encode(sample)
    pieces = " ".join(f"[{tok.token_bytes(i).decode('utf-8', 'replace')}]" for i in ids)
    lines = [
        f"tokenizer: {tok.identity.short()} ({tok.n_ranks} ranks) from {tok.source}",
        tok.vocab.describe(),
        f"specials: {', '.join(f'{n}={i}' for n, i in list(tok.vocab.specials.items())[:5])}, ...",
        f"sample: {sample!r}",
        f"ids ({len(ids)}, {len(sample.encode()) / max(len(ids), 1):.2f} bytes/token): {ids}",
        f"pieces: {pieces}",
        f"round trip ok: {tok.decode(ids) == sample}",
    ]
    return "\n".join(lines)


def resolve_image_inputs(specs: Sequence[str]) -> list:
    """Image files (directories, list files, paths) or KIND:PATH shard sources (their images)."""
    from moma.pipeline.documents import Document, ImageSegment
    from moma.pipeline.readers.base import ReaderOptions, make_reader, reader_kinds
    from moma.tokenizers.image_preprocess import find_images

    sources: list = []
    for spec in specs:
        if spec.split(":", 1)[0] in reader_kinds() and ":" in spec:
            reader = make_reader(spec, ReaderOptions(), 0)
            seen = set()
            for unit in reader.units():
                for record in reader.read(unit):
                    for seg in record.segments if isinstance(record, Document) else ():
                        if isinstance(seg, ImageSegment) and seg.identity not in seen:
                            seen.add(seg.identity)
                            sources.append(seg.source)
        else:
            sources += find_images([spec])
    return sources


def _cmd_train_image(args: argparse.Namespace) -> int:
    from moma.pipeline.config_parsing import apply_overrides, from_dict
    from moma.tokenizers.vq_train import ImageTrainConfig, train_image_tokenizer

    # `--set` goes through the same KEY=VALUE syntax and typed coercion as `moma train` overrides
    overrides = apply_overrides({}, args.set)
    if args.quantizer:
        overrides["quantizer"] = args.quantizer
    given = {"batch_size": args.batch_size, "lr": args.lr, "steps": args.steps, "max_minutes": args.max_minutes}
    cfg = from_dict(ImageTrainConfig, {"preset": args.preset, "overrides": overrides,
                                       **{k: v for k, v in given.items() if v is not None}}, "train-image")
    sources = resolve_image_inputs(args.images)
    if not sources:
        raise ValueError(f"no images found in {args.images}")
    train_image_tokenizer(sources, args.out, cfg, eval_sources=resolve_image_inputs(args.eval_images))
    return 0


def _cmd_encode_image(args: argparse.Namespace) -> int:
    import numpy as np

    from moma.tokenizers.image_preprocess import load_image
    from moma.tokenizers.image_tokenizer import ImageTokenizer

    tok = ImageTokenizer.load(args.tokenizer)
    codes = tok.encode([load_image(args.image, tok.resolution)])[0]
    np.save(args.out, codes)
    print(f"{args.image} -> {args.out}: {codes.size} codes of {tok.identity.short()} "
          f"({tok.cfg.grid}x{tok.cfg.grid}, range [{codes.min()}, {codes.max()}])")
    return 0


def _cmd_decode_image(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from moma.tokenizers.image_tokenizer import ImageTokenizer

    tok = ImageTokenizer.load(args.tokenizer)
    try:
        codes = np.load(args.codes, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{args.codes}: not a .npy array of codes ({e})") from None
    Image.fromarray(tok.decode(codes.reshape(1, -1))[0]).save(args.out)
    print(f"{args.codes} -> {args.out} ({tok.resolution}x{tok.resolution})")
    return 0


def _cmd_eval_image(args: argparse.Namespace) -> int:
    from moma.tokenizers.image_eval import evaluate_image_tokenizer
    from moma.tokenizers.image_tokenizer import ImageTokenizer

    tok = ImageTokenizer.load(args.tokenizer)
    report = evaluate_image_tokenizer(tok, resolve_image_inputs(args.images), grid_path=args.grid)
    print(json.dumps(report))
    return 0


def _model_commands(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="model presets: parameters, active parameters and FLOPs per token")
    msub = model.add_subparsers(dest="model_cmd", required=True, metavar="COMMAND")
    p = msub.add_parser("info", help="print the accounting of a preset (or of every preset with --all)")
    p.add_argument("--preset", default="tiny", help="tiny | 90m | 435m | 1.4b")
    p.add_argument("--ffn", default="moma_4t4i", help="dense | moe_8x | moma_1t1i | moma_4t4i | moma_<N>t<M>i")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--image-offset", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--all", action="store_true", help="every size x the paper's FFN variants, as a table")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_model_info)


def _cmd_model_info(args: argparse.Namespace) -> int:
    from moma.pipeline.model.accounting import count, describe
    from moma.pipeline.model.config import FFN_VARIANTS, SIZES, preset

    if args.all:
        print(f"{'preset':8} {'ffn':11} {'total':>9} {'active text':>12} {'active image':>13} {'GFLOP/token':>12}")
        for size in SIZES:
            for ffn in FFN_VARIANTS:
                acc = count(preset(size, ffn=ffn), args.seq_len)
                print(f"{size:8} {ffn:11} {acc.total_params / 1e6:8.1f}M {acc.active_params['text'] / 1e6:11.1f}M "
                      f"{acc.active_params['image'] / 1e6:12.1f}M {acc.flops_per_token['text'] / 1e9:12.3f}")
        return 0
    cfg = preset(args.preset, ffn=args.ffn, vocab_size=args.vocab_size, image_offset=args.image_offset)
    acc = count(cfg, args.seq_len)
    print(json.dumps({"config": cfg.to_json(), **acc.as_dict()}) if args.json else describe(cfg, acc))
    return 0


def _shards_commands(sub: argparse._SubParsersAction) -> None:
    from moma.pipeline.shards.build_config import BuildConfig

    shards = sub.add_parser("shards", help="build WebDataset shards of token documents, merge, inspect, verify")
    ssub = shards.add_subparsers(dest="shards_cmd", required=True, metavar="COMMAND")
    p = ssub.add_parser("build", help="sources -> tokenized documents -> tars + manifest (parallel, resumable)")
    p.add_argument("--source", action="append", required=True, metavar="KIND:PATH",
                   help="coco | folder | img2dataset | parquet | llava | obelics | mmc4 | text, then a path "
                        "(file, directory or glob); repeat for several sources")
    p.add_argument("--workers", type=int, default=1, help="local processes running partitions")
    p.add_argument("--partition", type=int, default=None, help="run only this partition (a SLURM array task)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished or staged build with other settings in --out (default: refuse, naming "
                        "the differences)")
    add_options(p, BuildConfig, skip={"sources"})
    p.set_defaults(func=_cmd_shards_build)

    p = ssub.add_parser("merge", help="after all partitions (e.g. a SLURM array) finished: number and index them")
    p.add_argument("out")
    p.add_argument("--max-reject-fraction", type=float, default=BuildConfig.max_reject_fraction,
                   help="fail (no manifest) when more than this fraction of the inputs was rejected; 1 accepts any "
                        "(default: %(default)s)")
    p.set_defaults(func=_cmd_shards_merge)

    p = ssub.add_parser("inspect", help="totals, per-shard stats, sample documents decoded (PNG)")
    p.add_argument("dir")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--png", default=None, help="write the samples' text and pictures here")
    p.add_argument("--text-tokenizer", default=None, help="default: the path recorded at build time")
    p.add_argument("--image-tokenizer", default=None)
    p.set_defaults(func=_cmd_shards_inspect)

    p = ssub.add_parser("verify", help="check every shard's size and sha256 against manifest.json (parallel); "
                                       "exit 1 naming each bad or missing shard")
    p.add_argument("dir")
    p.add_argument("--workers", type=int, default=None, help="hashing processes (default: one per CPU)")
    p.set_defaults(func=_cmd_shards_verify)


def _cmd_shards_build(args: argparse.Namespace) -> int:
    from moma.pipeline.shards.build import build
    from moma.pipeline.shards.build_config import BuildConfig

    cfg = options_from(args, BuildConfig, sources=args.source)
    result = build(cfg, workers=args.workers, partition=args.partition, overwrite=args.overwrite)
    if args.partition is not None:
        print(f"partition {args.partition}/{cfg.num_partitions}: {sum(s.docs for s in result.shards)} docs in "
              f"{len(result.shards)} shards, rejects {result.rejects}")
    return 0


def _cmd_shards_merge(args: argparse.Namespace) -> int:
    from moma.pipeline.shards.build import merge

    m = merge(args.out, max_reject_fraction=args.max_reject_fraction)
    print(f"merged {len(m.shards)} shards, {m.totals['docs']} docs -> {args.out}")
    return 0


def _cmd_shards_verify(args: argparse.Namespace) -> int:
    from moma.pipeline.shards.verify import verify

    result = verify(args.dir, workers=args.workers)
    for check in result.bad:
        print(check.line())
    print(result.summary())
    return 1 if result.bad else 0


def _cmd_shards_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moma.pipeline.shards.assemble import Tokenizers
    from moma.pipeline.shards.inspect import render_samples, summary
    from moma.pipeline.shards.manifest import Manifest

    directory = Path(args.dir)
    manifest = Manifest.load(directory)
    print(summary(manifest, directory))
    if args.samples:
        paths = manifest.build["settings"]["tokenizer_paths"]
        toks = Tokenizers.load(args.text_tokenizer or paths["text"], args.image_tokenizer or paths["image"])
        for line in render_samples(directory, manifest, toks, args.samples, Path(args.png) if args.png else None):
            print(line)
        if args.png:
            print(f"samples drawn to {args.png}")
    return 0


def _training_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with DeepSpeed (run under the deepspeed launcher, torchrun or srun)")
    p.add_argument("config", nargs="?", default=None, help="YAML/JSON run config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4")
    p.add_argument("--resume", default=None, help="auto (the run's latest checkpoint, if any) or a checkpoint path")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, batch arithmetic, parameters and expert placement; no DeepSpeed")
    p.add_argument("--check", action="store_true", help="validate only (what job scripts run before launching)")
    p.add_argument("--world-size", type=int, default=None, help="for --dry-run/--check: the world size to plan for")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="per-GPU memory the layout must fit (--dry-run: default 80, prints the plan; --check: "
                        "only when given); a layout that does not fit is refused naming its biggest item")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="checkpoint -> a self-contained model directory: safetensors with every "
                                      "expert (clean names), both tokenizers, HF config.json + modeling code")
    p.add_argument("checkpoint", help="checkpoint directory (with 'latest') or one global_step* directory")
    p.add_argument("--out", required=True, help="the export directory (created; files replaced when complete)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="larger weights are split into model-0000x-of-0000N.safetensors + an index (default: 5GB)")
    p.add_argument("--text-tokenizer", default=None, help="default: the run's (bundled into the export)")
    p.add_argument("--image-tokenizer", default=None, help="default: the run's (bundled into the export)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("train-aux-routers",
                       help="fit the auxiliary routers of causal inference to a checkpoint's expert choices "
                            "(main model frozen; deepspeed launcher, ZeRO, expert parallelism as `train`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. optim.lr=1e-3")
    p.add_argument("--from", dest="source", required=True, help="the pre-trained checkpoint (directory or tag)")
    p.add_argument("--data", nargs="+", required=True, metavar="SHARDS", help="training shards (DIR or DIR@WEIGHT)")
    p.add_argument("--eval-data", nargs="*", default=[], metavar="SHARDS", help="held-out shards for precision/recall")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", default=None, help="run directory (default: beside the checkpoint, aux_routers/)")
    p.add_argument("--resume", default="auto", help="auto (this run's latest checkpoint, if any) or a path")
    p.set_defaults(func=_cmd_train_aux_routers)

    p = sub.add_parser("upcycle", help="a moma_1t1i checkpoint -> a moma_NtMi model with the same function and "
                                       "data position, to continue training from (`train init_from=DIR`)")
    p.add_argument("--from", dest="source", required=True, help="the moma_1t1i checkpoint (directory or tag)")
    p.add_argument("--to", dest="target", required=True, help="the target variant, e.g. moma_4t4i")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.set_defaults(func=_cmd_upcycle)

    p = sub.add_parser("generate", help="text and images from an export (KV cache; one process, no DeepSpeed)")
    p.add_argument("--model", required=True, help="a `moma export` directory")
    p.add_argument("--prompt", default="", help="text after the (optional) image")
    p.add_argument("--image", default=None, help="an image file put before the text (e.g. to caption it)")
    p.add_argument("--generate-image", action="store_true", help="open an image after the prompt (<|boi|>)")
    p.add_argument("--image-out", default=None, help="write the first generated image here (PNG)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64, or one image's codes + 2")
    p.add_argument("--min-new-tokens", type=int, default=None,
                   help="no end of document (<|eos|>) before this many new tokens (default: 0; a caption of "
                        "--image: 5)")
    p.add_argument("--allow-images", action="store_true",
                   help="with --image: the continuation may hold images too (default: a caption, text only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance inside images (> 1)")
    p.add_argument("--no-cache", action="store_true", help="recompute every step (same tokens; slower)")
    p.add_argument("--text-tokenizer", default=None, help="default: the path recorded in the export")
    p.add_argument("--image-tokenizer", default=None)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="held-out loss by modality of a checkpoint or an export (one JSON line)")
    p.add_argument("model", help="an export directory, a checkpoint directory (with 'latest') or a global_step* dir")
    p.add_argument("--data", nargs="+", required=True, metavar="SHARDS", help="held-out shard directories")
    p.add_argument("--routing", choices=["ec", "causal"], default="ec",
                   help="expert choice as trained, or causal (needs the auxiliary routers)")
    p.add_argument("--batches", type=_batches, default=None,
                   help="all (default: every held-out document once) or the first N batches (never cycled)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the run's micro-batch")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="default: the run's data.seq_len")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="PNG loss curves by modality from a run's metrics.jsonl (plots/loss.png; "
                                    "plots/heldout.png: held-out loss, expert choice and causal)")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)


def _cmd_train(args: argparse.Namespace) -> int:
    from moma.pipeline.training.config import load_config
    from moma.pipeline.training.engine import configure_accelerator, launch_env

    configure_accelerator()
    cfg = load_config(args.config, args.overrides)
    if args.dry_run or args.check:
        from moma.pipeline.training.run_plan import plan_run

        world = args.world_size or launch_env()[1]
        plan = plan_run(cfg, world)
        print(plan.describe() if args.dry_run else f"config ok for world size {world}: {plan.model.ffn} "
              f"{cfg.model.preset}, {plan.ds_config['train_batch_size']} sequences per step")
        if args.dry_run or args.gpu_memory is not None:
            from moma.pipeline.training.memory_plan import plan_for_run

            memory = plan_for_run(plan, 80.0 if args.gpu_memory is None else args.gpu_memory)
            if args.dry_run:
                print("\n" + memory.describe())
            memory.check()
        return 0
    from moma.pipeline.training.train import train

    try:
        return train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        # Past validation these are failures, not input mistakes: keep the traceback.
        raise RuntimeError(f"training failed: {e}") from e


def _cmd_export(args: argparse.Namespace) -> int:
    from moma.pipeline.training.export import export_checkpoint, weight_files

    out = export_checkpoint(args.checkpoint, args.out, args.max_shard_size, args.text_tokenizer,
                            args.image_tokenizer)
    files = weight_files(out)
    print(f"exported {args.checkpoint} -> {out} ({files[0].name if len(files) == 1 else f'{len(files)} shards'}, "
          f"config.json, tokenizers/, modeling_moma.py)")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _batches(text: str) -> int | None:
    return None if text == "all" else _positive_int(text)


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from moma.pipeline.training.upcycle import upcycle

    out = upcycle(args.source, args.target, args.out)
    print(f"upcycled {args.source} -> {args.target} in {out}; continue training with\n"
          f"  deepspeed --num_gpus N --module moma.pipeline.cli train CONFIG model.ffn={args.target} init_from={out} "
          f"model.overrides.router_noise=1.0 --resume auto")
    return 0


def aux_router_config(args: argparse.Namespace) -> TrainConfig:  # noqa: F821 (lazy import)
    """The run config of an auxiliary-router fit: the checkpoint's own resolved config, pointed at the
    new data, the fit's steps and run directory, plus the command line's overrides."""
    from pathlib import Path

    from moma.pipeline.config_parsing import apply_overrides
    from moma.pipeline.loader.loader import DataSource
    from moma.pipeline.training.checkpoint import CheckpointError, find_checkpoint, load_model_states
    from moma.pipeline.training.config import TrainConfig, from_dict

    found = find_checkpoint(args.source, Path(args.source), verify=False)  # checked at setup, a share per rank
    if found is None:
        raise CheckpointError(f"--from {args.source}: no checkpoint")
    tag_dir = found[0] / found[1]
    tree = load_model_states(tag_dir)["moma"]["config"]
    sources = [DataSource.parse(d) for d in args.data]
    tree["data"]["sources"] = [{"path": s.path, "weight": s.weight} for s in sources]
    tree["data"]["eval_sources"] = [{"path": DataSource.parse(d).path} for d in args.eval_data]
    tree["eval"] = {"every": max(1, args.steps // 4) if args.eval_data else 0,
                    "batches": tree.get("eval", {}).get("batches", 8)}
    tree.update(run_dir=args.out or str(Path(tree["run_dir"]) / "aux_routers"), max_steps=args.steps,
                stop_at_step=None, aux_routers_from=str(tag_dir))
    tree["schedule"]["warmup_steps"] = min(tree["schedule"]["warmup_steps"], max(1, args.steps // 10))
    tree["checkpoint"]["dir"] = None
    return from_dict(TrainConfig, apply_overrides(tree, args.overrides))


def _cmd_train_aux_routers(args: argparse.Namespace) -> int:
    from moma.pipeline.training.engine import configure_accelerator

    configure_accelerator()
    cfg = aux_router_config(args)
    from moma.pipeline.training.train import train

    return train(cfg, resume=args.resume)


def _cmd_generate(args: argparse.Namespace) -> int:
    from moma.pipeline.training.engine import configure_accelerator

    configure_accelerator()
    from PIL import Image

    from moma.pipeline.generate import SamplingConfig, decode_output, encode_prompt, load_generator

    gen, text_tok, image_tok = load_generator(args.model, args.text_tokenizer, args.image_tokenizer)
    prompt, uncond = encode_prompt(gen.vocab, text_tok, image_tok, args.prompt, args.image, args.generate_image)
    from moma.pipeline.generate import CAPTION_MIN_TOKENS

    default = (gen.image_codes or 0) + 2 if args.generate_image else 64
    caption = args.image is not None and not args.generate_image and not args.allow_images
    max_new = args.max_new_tokens or default
    min_new = args.min_new_tokens if args.min_new_tokens is not None else \
        (min(CAPTION_MIN_TOKENS, max_new) if caption else 0)
    sampling = SamplingConfig(max_new_tokens=max_new, min_new_tokens=min_new, allow_images=not caption,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, cfg_scale=args.cfg_scale,
                              use_cache=not args.no_cache)
    new = gen.generate(prompt, sampling, uncond=uncond if args.generate_image else None,
                       stop_after_image=args.generate_image)
    text, images = decode_output(gen.vocab, text_tok, image_tok, ([gen.vocab.boi_id] if args.generate_image else [])
                                 + new)
    unfinished = gen.unfinished_image(prompt + new)
    result = {"prompt_tokens": len(prompt), "new_tokens": len(new), "text": text, "images": len(images),
              "unfinished_image": unfinished}
    if unfinished:
        print(f"moma: warning: the output ends inside an image ({len(new)} new tokens; an image takes "
              f"{gen.image_codes} codes + <|eoi|>): raise --max-new-tokens", file=sys.stderr)
    if args.image_out and images:
        Image.fromarray(images[0]).save(args.image_out)
        result["image_out"] = args.image_out
    elif args.image_out:
        raise ValueError("no complete image was generated (raise --max-new-tokens, or use --generate-image)")
    print(json.dumps(result))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from moma.pipeline.loader.loader import DataSource
    from moma.pipeline.training.engine import configure_accelerator

    configure_accelerator()
    from moma.pipeline.training.evaluate import (
        evaluate,
        heldout_batches,
        load_for_eval,
        model_forward,
        nonfinite_to_null,
    )
    from moma.pipeline.training.export import nonfinite_tensors

    model, vocab, run = load_for_eval(args.model)
    if not run.recorded:
        print(f"moma: warning: {args.model} records no data settings (an export from before they were recorded): "
              f"default loader settings, batch size 4; the figure may differ from training's", file=sys.stderr)
    data = dataclasses.replace(run.data, seq_len=args.seq_len or run.data.seq_len)
    batch_size = args.batch_size or run.batch_size
    sources = tuple(DataSource.parse(d) for d in args.data)
    batches = heldout_batches(data, sources, vocab, batch_size, args.batches)
    from moma.pipeline.training.metrics import RoutingHealthTotals, no_expert_warning

    health = RoutingHealthTotals(model) if args.routing == "ec" and hasattr(model, "moe_gates") else None
    result, bad = nonfinite_to_null(evaluate(model_forward(model, collect_stats=health is not None), batches,
                                             args.routing, health=health))
    if os.environ.get("RANK", "0") != "0":  # under a launcher every rank computes the same: one line
        return 1 if bad else 0
    print(json.dumps({"model": str(args.model), "routing": args.routing, "seq_len": data.seq_len,
                      "batch_size": batch_size,
                      "whole_set": args.batches is None or len(batches) < args.batches, **result}))
    warning = no_expert_warning(result.get("routing_health") or {}, 0.5)
    if warning:
        print(f"moma: warning: {warning}", file=sys.stderr)
    if bad:
        tensors = nonfinite_tensors(model)
        print(f"moma: warning: {', '.join(bad)} not finite (null above)"
              + (f": {len(tensors)} weight tensors hold NaN or inf (first: {tensors[0]})" if tensors else ""),
              file=sys.stderr)
        return 1
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from moma.pipeline.training.metrics import plot, plot_heldout

    print(f"wrote {plot(args.run_dir)}")
    heldout = plot_heldout(args.run_dir)  # held-out curves, both routings when the run has them
    if heldout is not None:
        print(f"wrote {heldout}")
    return 0


def _experiment_commands(sub: argparse._SubParsersAction) -> None:
    from moma.pipeline.experiments.flops_savings import SCALES, VARIANTS

    exp = sub.add_parser("experiment", help="the paper's measurements, end to end")
    esub = exp.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    p = esub.add_parser("flops-savings", help="FLOPs savings of each variant over dense at equal active FLOPs per "
                                              "token, overall and by modality (report.md, report.json, PNGs)")
    p.add_argument("--data", nargs="+", required=True, metavar="SHARDS", help="training shards (DIR or DIR@WEIGHT)")
    p.add_argument("--eval-data", nargs="+", required=True, metavar="SHARDS", help="held-out shards")
    p.add_argument("--text-tokenizer", required=True, help="the BPE the shards were built with")
    p.add_argument("--image-tokenizer", required=True, help="the image tokenizer the shards were built with")
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated FFN variants, each optionally with ModelConfig overrides of its own "
                        "(moma_4t4i+router_rank=softmax+router_assign=balanced); dense is always included")
    p.add_argument("--model-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="ModelConfig overrides for every run, dense included (an ablation: block_norm=swin)")
    p.add_argument("--dense-budgets", default=None,
                   help="comma-separated multiples of the scale's steps dense trains at (default: the scale's)")
    p.add_argument("--seeds", type=int, default=None, help="default: the scale's (cpu: 2)")
    p.add_argument("--variant-budgets", default="1",
                   help="comma-separated multiples of the scale's steps each variant trains at (dense too), e.g. 1,4")
    p.add_argument("--out", required=True, help="experiment directory (rerun with the same one to resume)")
    p.set_defaults(func=_cmd_flops_savings)


def _cmd_flops_savings(args: argparse.Namespace) -> int:
    from moma.pipeline.experiments.flops_savings import ExperimentInputs, run_experiment
    from moma.pipeline.loader.loader import DataSource

    inputs = ExperimentInputs(data=tuple(DataSource.parse(d) for d in args.data),
                              eval_data=tuple(DataSource.parse(d) for d in args.eval_data),
                              text_tokenizer=args.text_tokenizer, image_tokenizer=args.image_tokenizer)
    import yaml

    def multiples(flag: str, text: str) -> list[float]:
        try:
            return [float(m) for m in text.split(",") if m]
        except ValueError:
            raise ValueError(f"{flag}: numbers separated by commas, got {text!r}") from None

    model_set = {}
    for item in args.model_set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--model-set: FIELD=VALUE, got {item!r}")
        model_set[key] = yaml.safe_load(value)
    run_experiment(inputs, args.scale, args.out, [v for v in args.variants.split(",") if v], args.seeds,
                   command="moma " + " ".join(sys.argv[1:]),
                   variant_budgets=multiples("--variant-budgets", args.variant_budgets),
                   dense_budgets=multiples("--dense-budgets", args.dense_budgets) if args.dense_budgets else None,
                   model_set=model_set)
    return 0


def _demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on embedded data: tokenizers, shards, 2-rank MoMa training, "
                                    "stop, resume, report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--images", type=int, default=3000, help="generated captioned pictures")
    p.add_argument("--image-minutes", type=float, default=2.5, help="VQ tokenizer training budget")
    p.add_argument("--steps", type=int, default=240, help="training steps (stop and resume at half)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from moma.pipeline.demo import run_demo

    run_demo(args.out, images=args.images, image_minutes=args.image_minutes, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moma",
        description="MoMa pipeline: corpora -> tokenizers -> WebDataset shards -> DeepSpeed MoE training.",
    )
    # the deepspeed launcher passes --local_rank=N before the subcommand; the rank is read from LOCAL_RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _tokenizer_commands(sub)
    _shards_commands(sub)
    _model_commands(sub)
    _training_commands(sub)
    _experiment_commands(sub)
    _demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except (FileNotFoundError, PermissionError, ValueError, MomaError) as e:
        # Input and config problems: one clear line, no traceback.
        print(f"moma: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
