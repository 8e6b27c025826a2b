"""YAML -> dataclass configs with `--set key.sub=value` overrides.

Every config in the project is a dataclass whose field defaults are the one place a default lives.
YAML files and command-line overrides only name the fields they change; an unknown key is an
error that names the key and the file, never silently ignored. A choice is a `Literal[...]` field:
the loader (and `check_choices`, for configs built in code) refuses any other value.

A section (a field whose type is a dataclass) may be written as the path of a YAML file holding
it, e.g. `model: configs/model/tiny.yaml` in a training config; `--set model.lm.hidden_size=32`
then changes one field of that file's content. A section written as a mapping may name such a
file under `base:`; its other keys change fields of the file's content.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mmdlm.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not fit its dataclass."""


@functools.cache  # resolving the annotations is ~0.4 ms a call: the server checks every request's SamplerConfig
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


def choices_of(tp: Any) -> tuple | None:
    """Return the values a `Literal[...]` type (or `Literal[...] | None`) allows, None for any other type."""
    tp = _unwrap_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def _check_choice(value: Any, tp: Any, where: str) -> None:
    """Raise ConfigError unless `value` is allowed by `tp`: one of a Literal's values, or a list/tuple of them."""
    choices, tp = choices_of(tp), _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp) and isinstance(value, (list, tuple)):
        for item in value:
            _check_choice(item, typing.get_args(tp)[0], where)
    elif choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{where}={value!r} must be one of {choices}")


def check_choices(cfg: Any, where: str = "") -> None:
    """Raise ConfigError naming the first `Literal` field of dataclass `cfg` (nested ones too) with another value."""
    for name, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{where}{name}.")
        else:
            _check_choice(value, tp, f"{where}{name}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as scalar type `tp` (bool, int, float, str), or raise ConfigError naming the key.

    YAML 1.1 reads `5e-4` (no dot) as a string, so numbers written that way are converted here
    instead of failing later as a string in an arithmetic expression.
    """
    _check_choice(value, tp, where)
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
        if dataclasses.is_dataclass(tp) and isinstance(value, (dict, str)):
            value = from_dict(tp, section(value), f"{where}.{name}")
        else:
            value = _coerce(value, tp, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config as plain nested dicts (for YAML/JSON dumps and logging)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `changes` written over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def section(value: str | dict[str, Any]) -> dict[str, Any]:
    """Return a section given as a mapping, as the path of a YAML file, or as a mapping with a `base:` file."""
    if isinstance(value, str):
        return load_yaml(value)
    if "base" in value:
        changes = dict(value)
        return _merge(section(changes.pop("base")), changes)
    return value


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
            if isinstance(node.get(part), str):  # a section given as a YAML file: read it, then change a field
                node[part] = load_yaml(node[part])
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
