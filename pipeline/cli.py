"""The `moma` command: one entry point for every stage.

    moma --help
    moma tokenizer train-text --input corpus/ --vocab-size 8192 --out runs/tok/text

Subcommand handlers import their heavy dependencies (torch, deepspeed) lazily so that `--help`
and config errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

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


def show_text_tokenizer(tok: "TextTokenizer", sample: str) -> str:  # noqa: F821 (lazy import)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moma",
        description="MoMa pipeline: corpora -> tokenizers -> WebDataset shards -> DeepSpeed MoE training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _tokenizer_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        # Input and config problems: one clear line, no traceback.
        print(f"moma: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
