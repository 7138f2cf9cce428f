"""Typed-dataclass config machinery: fields with help text, values checked against their
annotations (naming the key and what is allowed), nested dataclasses built from mappings,
and dotted ``section.key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown or a value is not allowed; the message names both."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults via ``default_factory``)."""
    if isinstance(default, (list, dict)):
        def fresh() -> Any:  # each config its own copy
            return type(default)(default)

        return field(default_factory=fresh, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)



def check_value(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message ("expected a number, ...")
            try:
                return check_value(key, value, options[0])
            except ConfigError as e:
                raise ConfigError(f"{e} (or null)") from None
        for arg in options:
            try:
                return check_value(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {type_name(tp)}")
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to {type_name(item)}, "
                              f"got {value!r}")
        return {k: check_value(f"{key}.{k}", v, item) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {type_name(item)}, got {value!r}")
        return [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return f"dict[str, {type_name(typing.get_args(tp)[1])}]"
    return "null" if tp is type(None) else tp.__name__


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid: {', '.join(valid)})")


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise unknown_key(full, names)
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = check_value(full, value, tp)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); ``"data.replay.ratio=0.25"`` ->
    (["data", "replay", "ratio"], 0.25). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override key {key!r} must be section.key (e.g. optim.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """``data[path[0]][path[1]]... = value``, making the mappings on the way.

    Raises:
        ConfigError: a step on the way holds a value that is not a mapping.
    """
    node = data
    for i, part in enumerate(path[:-1]):
        if node.get(part) is None:  # absent, or an empty YAML section
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: expected a mapping, got {node!r}")
    node[path[-1]] = value


def option_lines(cls: type, prefix: str) -> list[tuple[str, Any, str, str]]:
    """``(dotted key, default, type name, help)`` of every field of ``cls``, nested
    dataclass sections included (their fields as ``prefix.section.key``)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows += option_lines(tp, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f"{prefix}{f.name}", default, type_name(tp), f.metadata["help"]))
    return rows


def yaml_fields(cls: type, indent: str) -> list[str]:
    """Every field of ``cls`` as a ``# help  [type]`` comment over ``key: default`` YAML,
    nested dataclass sections indented under their name."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{indent}{f.name}:")
            lines += yaml_fields(hints[f.name], indent + "  ")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"{indent}# {f.metadata['help']}  [{type_name(hints[f.name])}]")
        dumped = yaml.safe_dump({f.name: default}, default_flow_style=True, width=1000)
        lines.append(f"{indent}{dumped.strip()[1:-1]}")
    return lines
