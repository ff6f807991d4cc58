"""Typed configuration trees: dataclasses read from YAML/JSON plus `a.b=c` overrides.

The one parser behind every setting a user can give — the run config (`moma train`), the model
overrides inside it, the image tokenizer's `--set FIELD=VALUE` and a ModelConfig read back from
an export — so every key goes through the same coercion and the same errors:

    from_dict(TrainConfig, apply_overrides(yaml_tree, ["optim.lr=3e-4", "model.overrides.n_layers=2"]))

* an unknown key names itself and the keys known at that place;
* a wrong type names the key, the expected type and the value (``'two'`` for an int, ``true`` for
  a number); YAML 1.1 reads ``1e-5`` as a string, so a float field also takes a numeric string;
* a mapping whose keys are the fields of another dataclass (``model.overrides`` holds ModelConfig
  fields) is declared with `fields_of(...)` and coerced against that dataclass's types.

Overrides are `KEY=VALUE` with VALUE parsed as YAML (numbers, booleans, lists, null): one syntax
for every command.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from moma.pipeline.errors import MomaError


class ConfigError(MomaError, ValueError):
    """A configuration that cannot work, found before anything is launched."""


def fields_of(target: str, exclude: Iterable[str] = (), doc: str = "") -> Any:
    """A `dict[str, Any]` field whose keys are fields of the dataclass `target` ("module:Class",
    imported lazily) and whose values are coerced to those fields' types. `exclude`: fields that
    are not the user's to set here."""
    return dataclasses.field(default_factory=dict,
                             metadata={"fields_of": target, "exclude": tuple(exclude), "doc": doc})


@functools.cache
def _resolve(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot, no exponent sign) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def coerce_fields(cls: type, data: dict[str, Any], where: str, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """`data`'s keys checked against `cls`'s fields and its values coerced to their types (a
    partial set of fields: overrides)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    excluded = set(exclude)
    names = {f.name for f in dataclasses.fields(cls) if f.init} - excluded
    for key in data:
        if key in excluded:
            raise ConfigError(f"{_join(where, key)}: not settable here ({', '.join(sorted(excluded))} are set "
                              f"elsewhere)")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r} (known here: {sorted(names)})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        target = fields[key].metadata.get("fields_of")
        if target:
            out[key] = coerce_fields(_resolve(target), value, _join(where, key), fields[key].metadata["exclude"])
        else:
            out[key] = _coerce(value, hints[key], _join(where, key))
    return out


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """An instance of dataclass `cls` from a (nested) mapping; ConfigError names any bad key.
    The dataclass's own checks (`__post_init__` ValueErrors) become ConfigErrors at `where`."""
    kwargs = coerce_fields(cls, data, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def parse_value(text: str) -> Any:
    """An override's VALUE: YAML (numbers, lists, booleans, null), else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`a.b=c` into the nested mapping `data` (c parsed by `parse_value`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. optim.lr=3e-4)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = parse_value(raw)
    return data


def read_tree(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file's top-level mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot be parsed ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def to_tree(obj: Any) -> Any:
    """A config dataclass as plain containers (YAML/JSON-ready; tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_tree(v) for k, v in obj.items()}
    return obj
