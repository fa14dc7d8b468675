"""Build typed config dataclasses from plain mappings (YAML, JSON, CLI overrides).

Every problem is collected with its dotted path and reported at once in one `ConfigError`:
unknown keys (with the allowed ones), wrong types, values outside a `Literal`'s choices, and
whatever the dataclass's own `problems()` method finds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

from .errors import ConfigError

__all__ = ["describe_fields", "from_dict", "type_name"]

T = TypeVar("T")


def type_name(annotation: Any) -> str:
    """A readable name for an annotation: 'int or null', "one of 'a', 'b'", ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if annotation is type(None):
        return "null"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _convert(annotation: Any, value: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            converted = _convert(arg, value, path, trial)
            if not trial:
                return converted
        problems.append(f"{path}: expected {type_name(annotation)}, got {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            problems.append(f"{path}: {value!r} is not allowed; allowed: "
                            + ", ".join(repr(c) for c in choices))
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected {type_name(annotation)}, got {value!r}")
            return None
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path, problems)
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation in (str, bool):
        if isinstance(value, annotation):
            return value
    else:
        return value
    problems.append(f"{path}: expected {type_name(annotation)}, got {value!r}")
    return None


def _build(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown option; allowed: {', '.join(sorted(known))}")
    values = {}
    failed = False
    for key, value in data.items():
        if key in known:
            before = len(problems)
            converted = _convert(hints[key], value, f"{prefix}{key}", problems)
            if len(problems) == before:
                values[key] = converted
            else:
                failed = True
    missing = [name for name, f in known.items()
               if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    for name in missing:
        problems.append(f"{prefix}{name}: required option is missing")
    if missing:
        return None
    # Fields that failed fall back to their defaults here, so that the object's own checks
    # still run and every problem is reported in one go; the object is discarded if any failed.
    try:
        obj = cls(**values)
    except ConfigError as exc:
        problems.extend(f"{prefix}{p}" if prefix else p for p in exc.problems)
        return None
    check = getattr(obj, "problems", None)
    if callable(check):
        problems.extend(f"{prefix}{p}" if prefix else p for p in check())
    return None if failed else obj


def from_dict(cls: type[T], data: Any, *, source: str | None = None) -> T:
    """Build dataclass `cls` from `data`, or raise one ConfigError listing every problem."""
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    if problems or obj is None:
        raise ConfigError(problems or ["invalid configuration"], source=source)
    return obj


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of a dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append((f.name, type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out
