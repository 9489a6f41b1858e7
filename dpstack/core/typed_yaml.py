"""Typed configs from YAML: plain data checked against dataclass field types.

One set of rules for every config dpstack reads (the training config, the robot YAML):
- yaml.safe_load only, so a config file can never execute code;
- field types: bool, int, float, str, Literal[...], Optional/Union (first type that
  fits, in the order written), nested dataclasses, list[X], tuple[X, ...], tuple[X, Y], dict, Any;
- a float field also takes a numeral that PyYAML reads as a string: YAML 1.1 wants
  `1.0e-4`, people write `1e-4`;
- an empty section (`train:` with nothing under it) means that section's defaults;
- unknown keys are refused; every error names the dotted path of its key
  (`safety.workspace_low[2]`);
- `--set a.b=value` overrides are YAML too: `[1, 2]` is a list, `3e-4` a number, `true` a bool.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

T = TypeVar("T")

# Decimal numerals float() reads but YAML 1.1 leaves as strings (no "inf"/"nan" words).
_NUMERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config file or override does not match its schema; the message names the key."""


def find_config(name_or_path: str | Path, config_dir: Path) -> Path:
    """A path to a YAML file, or the bare name of a shipped config (`sim` -> config_dir/sim.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = config_dir / f"{name_or_path}.yaml"
    if not path.suffix and shipped.is_file():
        return shipped
    have = sorted(p.stem for p in config_dir.glob("*.yaml"))
    raise ConfigError(f"no config {str(name_or_path)!r}: not a file and not one of the shipped configs {have}")


def read_yaml(path: str | Path) -> Any:
    """The plain data in a YAML file (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return {} if data is None else data


def load_yaml(cls: type[T], path: str | Path | None, overrides: Iterable[str] = ()) -> T:
    """`cls` from a YAML file (None: from its defaults) with `a.b=value` overrides applied."""
    data = apply_overrides(read_yaml(path) if path is not None else {}, overrides)
    try:
        return from_data(cls, data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(data: Any, overrides: Iterable[str]) -> Any:
    """A copy of `data` with each `a.b=value` set; the value is parsed as YAML."""
    overrides = list(overrides)
    if not overrides:
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ConfigError(f"override {item!r} must look like key=value or section.key=value (e.g. train.steps=500)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        node = out
        for i, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = node[part]
        node[path[-1]] = value
    return out


def from_data(cls: type[T], data: Any, where: str = "") -> T:
    """`cls` built from plain data; ConfigError names the dotted path of what does not fit."""
    return _convert(cls, data, where)


def to_data(value: Any) -> Any:
    """Plain data (dicts, lists, scalars) from a config dataclass: what from_data reads back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: to_data(v) for k, v in value.items()}
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    name = where or "config"
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise ConfigError(f"{name}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, {} if value is None else value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
            items = [_convert(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _NUMERAL.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp!r} in schema")


def _dataclass(tp: Any, value: Any, where: str) -> Any:
    name = where or "config"
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
    unknown = sorted(str(k) for k in value if k not in fields)
    if unknown:
        dotted = [f"{where}.{k}" if where else k for k in unknown]
        raise ConfigError(f"unknown key(s) {dotted}; {name} takes {sorted(fields)}")
    kwargs = {}
    for fname, f in fields.items():
        sub = f"{where}.{fname}" if where else fname
        if fname in value:
            kwargs[fname] = _convert(hints[fname], value[fname], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    try:
        return tp(**kwargs)
    except ConfigError:
        raise  # a validation that already names its keys
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{name}: {e}") from None
