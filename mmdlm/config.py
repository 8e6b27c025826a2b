"""YAML -> dataclass configs with `--set key.sub=value` overrides.

Every config in the project is a dataclass whose field defaults are the one place a default lives.
YAML files and command-line overrides only name the fields they change; an unknown key is an
error that names the key and the file, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmdlm.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not fit its dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> Any:
    """Return X for `X | None` / `Optional[X]`, else tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as scalar type `tp` (bool, int, float, str), or raise ConfigError naming the key.

    YAML 1.1 reads `5e-4` (no dot) as a string, so numbers written that way are converted here
    instead of failing later as a string in an arithmetic expression.
    """
    if tp not in (bool, int, float, str) or value is None:
        return value
    if isinstance(value, bool) or tp is bool:  # bool is an int to Python, never to a config
        if isinstance(value, bool) and tp is bool:
            return value
    elif isinstance(value, tp):
        return value
    elif tp is float and isinstance(value, int):
        return float(value)
    elif tp is str and isinstance(value, (int, float)):
        return str(value)
    elif isinstance(value, str):  # tp is int or float
        try:
            return tp(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Return an instance of dataclass `cls` built from a (nested) dict; unknown keys raise."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(types_)}")
    kwargs = {}
    for name, value in data.items():
        tp = _unwrap_optional(types_[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, f"{where}.{name}")
        else:
            value = _coerce(value, tp, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config as plain nested dicts (for YAML/JSON dumps and logging)."""
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    # YAML scalars: `3`, `1e-4`, `true`, `null`, `[1, 2]`, or a plain string.
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return `data` with each `key.sub=value` override set (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(text)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Return the mapping stored in a YAML file, with a clear error when it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Return `cls` filled from an optional YAML file, then `--set` style overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data, where=str(path) if path else "overrides")
