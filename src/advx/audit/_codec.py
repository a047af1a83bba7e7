"""Dataclasses to JSON types and back, driven by their fields' annotations.

Three pieces of field metadata: ``{"json": "class"}`` names the field's JSON key when it differs
from the Python name, ``{"rest": True}`` marks a ``dict`` field that holds every key the
other fields do not name (written flat, beside them), and ``{"memory": True}`` a field held in
memory only (tensors, never written to JSON, never read from it). Reading is strict: a missing
required field, an unknown key or a wrong container type is an error that names its place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from ..errors import InputError

__all__ = ["encode", "decode"]

T = TypeVar("T")


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


def encode(obj: Any) -> Any:
    """Plain JSON types: dataclasses become dicts in field order, tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("memory"):
                continue
            value = encode(getattr(obj, f.name))
            if f.metadata.get("rest"):
                out.update(value)
            else:
                out[_key(f)] = value
        return out
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    return obj


def decode(cls: type[T], data: Any, where: str) -> T:
    """The dataclass ``cls`` read from ``data`` (what :func:`encode` wrote); ``where`` names
    the place in error messages (e.g. ``"report.json"``)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("memory")]  # type: ignore[arg-type]
    rest = next((f for f in fields if f.metadata.get("rest")), None)
    named = {_key(f): f for f in fields if f is not rest}
    unknown = [k for k in data if k not in named]
    if unknown and rest is None:
        raise InputError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))} (this advx reads "
            f"{', '.join(named)}); was it written by a newer advx?"
        )
    kwargs: dict[str, Any] = {}
    for key, f in named.items():
        if key in data:
            kwargs[f.name] = _value(hints[f.name], data[key], f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{where}: the required field {key!r} is missing")
    if rest is not None:
        kwargs[rest.name] = {k: data[k] for k in unknown}
    return cls(**kwargs)


def _value(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return decode(tp, value, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {type(value).__name__}")
        return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value  # numbers, strings, bools and free-form dicts: the JSON Schema checks them
