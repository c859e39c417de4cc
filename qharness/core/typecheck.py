"""Check raw YAML values against a config dataclass's field types before the dataclass sees them.

YAML says `limit: two`, `limit: 1.5`, `keep_positions: 0` or `scan: "no"` without complaint, and Python would
iterate a string per character or read "no" as true. `from_mapping(cls, raw, where)` refuses unknown keys and any
value that does not fit its field's annotation with one line naming the key, the value and the expected type, and
turns YAML lists into the tuples the frozen configs hold. Supported annotations: str, int, float, bool, Any,
Literal[...], X | None, tuple[X, ...], dict[str, X].
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from qharness.core.errors import ConfigError


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


class _Mismatch(Exception):
    pass


def coerce(value: Any, hint: Any) -> Any:
    """`value` as `hint` describes it (lists become tuples); raises _Mismatch when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise _Mismatch
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(coerce(item, args[0]) for item in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    raise TypeError(f"typecheck cannot check {hint!r}")  # a field type this module does not know: our bug


def from_mapping(cls: type, raw: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments for `cls(**...)` from a YAML mapping, every value checked against its field's type."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.name not in skip]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")
    checked = {}
    for name, value in raw.items():
        try:
            checked[name] = coerce(value, hints[name])
        except _Mismatch:
            raise ConfigError(f"{where}: {name} is {value!r} ({type(value).__name__}); expected "
                              f"{_describe(hints[name])}") from None
    return checked


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file of ours holds (a sweep, a recipe, a task), or one line naming the file and what is
    wrong: missing, not UTF-8, not YAML (with the line), or not a mapping (`what` says what it should hold)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line} ({getattr(exc, 'problem', None) or type(exc).__name__})"
                          ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what}, got {type(raw).__name__}")
    return raw
