"""The package and its front door: the CLI lists every stage, the wheel lists every subpackage, no
bare `tokenizers`/`pipeline` imports, and the README's commands are what CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

from moma.pipeline.cli import build_parser, resolve_image_inputs

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "moma.pipeline.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("tokenizer", "shards", "model", "train", "export", "plot", "demo"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    tok_help = build_parser().parse_args(["tokenizer", "show", "x"])  # subcommands parse
    assert tok_help.path == "x"


def test_every_subpackage_is_in_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {"tokenizers": "moma.tokenizers", "pipeline": "moma.pipeline", "ds_configs": "moma.ds_configs"}
    for folder, package in roots.items():
        for d in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if any(d.glob("*.py")) and "__pycache__" not in d.parts:
                name = ".".join([package, *d.relative_to(REPO / folder).parts])
                assert name in listed, f"{d} holds Python files but {name} is not in pyproject's packages"


def test_no_bare_top_level_imports() -> None:
    bare = re.compile(r"^\s*(from|import)\s+(tokenizers|pipeline)(\s|\.|$)", re.M)
    for path in [*REPO.glob("tokenizers/**/*.py"), *REPO.glob("pipeline/**/*.py"), *REPO.glob("jobs/**/*.py"),
                 *REPO.glob("tests/**/*.py")]:
        assert not bare.search(path.read_text()), path


def test_readme_commands_and_ci() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("```", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 2 and "moma demo" in lines[0] and "pytest" in lines[1]
    assert lines[1] in (REPO / ".ci" / "run").read_text()


def test_train_image_accepts_shard_source_specs(tmp_path: Path) -> None:
    from corpus_fixtures import write_coco, write_folder

    coco = write_coco(tmp_path / "coco", n=3, missing=1)
    sources = resolve_image_inputs([f"coco:{coco}", str(write_folder(tmp_path / "folder"))])
    assert len(sources) == 3 + 4  # each COCO image once (not once per caption), plus the folder's images


def test_the_code_passes_its_linter() -> None:
    """`ruff check` with the project's configuration (pyproject.toml), so CI lints on every run."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _commands(parser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    return [c for name, sub in subs[0].choices.items() for c in _commands(sub, (*prefix, name))]


def test_help_of_every_command_answers_without_importing_torch() -> None:
    """`moma --help` and `moma <cmd> --help` only build the parser: torch stays unimported (it takes
    seconds to import), and the parse costs well under a second of CPU."""
    commands = [(), *_commands(build_parser())]
    assert len(commands) > 15
    probe = (
        "import sys, time, contextlib, io\n"
        "t = time.process_time()\n"
        "from moma.pipeline.cli import main\n"
        f"for argv in {[list(c) for c in commands]!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([*argv, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print('torch' in sys.modules, time.process_time() - t)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False", "a --help imported torch"
    # CPU seconds for every command's help together (each alone answers well under 1 s; with torch: ~5 s)
    assert float(out[1]) < 2.0, out
