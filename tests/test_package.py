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
