"""Typed config sections from nested dicts (loaded YAML): key and type checks, ``key.sub=value`` overrides.

The machinery under :mod:`mmtrain.config`, in a module that imports nothing of mmtrain but
:mod:`mmtrain.errors`, so that a section's own code (``DataConfig`` building its sources from
mappings) checks keys and types the same way the loader does, without importing the run config.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any

import yaml

from mmtrain.errors import ConfigError


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` items into a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
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
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_dataclass(cls: type, tree: dict, where: str) -> Any:
    """Construct dataclass ``cls`` from a nested dict, checking keys and types.

    ``where`` is the section's dotted key (``data``, ``data.sources[0]``; "" = the whole config):
    every error, the section's own validation included, is a :class:`ConfigError` naming the key."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping (section), got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in tree.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key {path!r} (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # the section's own validation (__post_init__)
        raise ConfigError(_name_key(str(exc), cls, fields, where)) from exc


def _name_key(message: str, cls: type, fields: dict, where: str) -> str:
    """A section's validation message with the section's dotted key in front, unless it names it already.

    ``mode: expected ...`` of section ``data`` -> ``data.mode: expected ...``; ``TextTokenizerConfig.vocab_size: ...``
    of ``tokenizer.text`` -> ``tokenizer.text.vocab_size: ...``; ``train.precision: ...`` of ``train`` stays."""
    if not where:
        return message
    if message.startswith((f"{cls.__name__}.", f"{cls.__name__}:")):
        return where + message[len(cls.__name__):]
    if re.match(re.escape(where) + r"(?![\w\[])", message):
        return message
    first = re.match(r"\w+", message)
    if first and first.group() in fields and message[first.end():first.end() + 1] in (".", ":", "=", "["):
        return f"{where}.{message}"
    return f"{where}: {message}"


def option_overrides(section: str, values: dict[str, Any]) -> list[str]:
    """``section.key=value`` override items for command-line options: ``values`` maps keys to option
    values, None = the option was not given. JSON-quoted, so each value reads back as itself (a YAML
    scalar like ``12:00`` would be read as a base-60 integer)."""
    return [f"{section}.{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def override_section(section: Any, where: str, overrides: list[str]) -> Any:
    """A section of a loaded config (``run.cfg.sample``) with ``key=value`` or ``WHERE.key=value`` overrides,
    checked and validated as if loaded from a file; errors name ``WHERE.key``."""
    tree = apply_overrides(dataclasses.asdict(section), [o.removeprefix(f"{where}.") for o in overrides])
    return build_dataclass(type(section), tree, where)
