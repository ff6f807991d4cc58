"""moma: pre-train early-fusion multimodal MoE language models (MoMa) on DeepSpeed.

    import moma
    m = moma.load("runs/demo/run/export")     # an export: model + both tokenizers (pipeline/api.py)
    m.generate("a red circle")["text"]

The command line is `moma` (pipeline/cli.py); the stages live in moma.pipeline and moma.tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A source checkout (also an editable install): the halves live in top-level folders beside this one
# (pipeline/, tokenizers/ — a namespace portion, see pyproject.toml), so they are searched there too.
# An installed wheel has them inside moma/ and skips this.
_root = Path(__file__).resolve().parent.parent
if (_root / "pipeline" / "cli.py").is_file() and (_root / "tokenizers" / "text.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (the package's own __path__)


def load(directory: Any, text_tokenizer: str | None = None, image_tokenizer: str | None = None) -> Any:
    """A `moma export` directory as a `moma.pipeline.api.Moma`: encode / decode / generate / logits."""
    from moma.pipeline.api import load as _load  # torch is imported on first use, not by `import moma`

    return _load(directory, text_tokenizer, image_tokenizer)
