"""Command-line options generated from a config dataclass, so that a setting is defined once (type,
default, help) in the dataclass of the stage that uses it and the CLI only names it.

    add_options(parser, BuildConfig, skip={"sources"})       # --max-docs-per-shard INT (default 10000) ...
    cfg = options_from(args, BuildConfig, sources=args.source)

A field's `metadata` may carry `help`, `choices`, `flag` (the option's name when it is not the
field's), `path` (resolved to an absolute path) and `required`. Nested dataclass fields
(BuildConfig.options: ReaderOptions) contribute their own options, flattened.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


def _scalar(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) of a field annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_options(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = _scalar(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, skip)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{help_text} (default: {default})" if default is not None
                                  and not f.metadata.get("required") else help_text or None}
        if f.metadata.get("required"):
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        else:
            kwargs.update(type=tp, default=default, choices=f.metadata.get("choices"))
        parser.add_argument(_flag(f), **kwargs)


def options_from(args: argparse.Namespace, cls: type, **given: Any) -> Any:
    """An instance of `cls` from the parsed options (plus the fields in `given`)."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            kwargs[f.name] = given[f.name]
            continue
        tp, _ = _scalar(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = options_from(args, tp)
            continue
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is not None and f.metadata.get("path"):
            value = str(Path(value).resolve())
        kwargs[f.name] = value
    return cls(**kwargs)
