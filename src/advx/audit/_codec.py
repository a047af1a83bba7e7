"""Dataclasses to JSON types and back, driven by their fields' annotations.

Three pieces of field metadata: ``{"json": "class"}`` names the field's JSON key when it differs
from the Python name, ``{"rest": True}`` marks a ``dict`` field that holds every key the
other fields do not name (written flat, beside them), and ``{"memory": True}`` a field held in
memory only (tensors, never written to JSON, never read from it). Reading is strict: a missing
required field, an unknown key or a wrong container type is an error that names its place.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
import types
import typing
import zlib
from typing import Any, TypeVar

import numpy as np

from ..errors import InputError

__all__ = ["encode", "decode", "png_encode", "png_decode", "PNG_URI"]

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


# ---- images: 8-bit PNGs in data URIs -------------------------------------------------------
# The report's example images are PNG data URIs: lossless, a fraction of the size of nested
# JSON lists, and shown by a browser as they are. Written with zlib and struct (no imaging
# library needed); the reader takes 8-bit greyscale or RGB PNGs, not interlaced, any filter.

PNG_URI = "data:image/png;base64,"
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR = {1: 0, 3: 2}  # channels -> PNG colour type (greyscale, truecolour)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_encode(pixels: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of ``pixels``: uint8, (C, H, W), C = 1 or 3."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[0] not in _COLOUR:
        raise ValueError(
            f"pixels: expected uint8 of shape (1 or 3, H, W), got {pixels.dtype} {pixels.shape}"
        )
    c, h, w = pixels.shape
    raw = np.ascontiguousarray(pixels.transpose(1, 2, 0)).reshape(h, w * c).astype(np.int16)
    left = np.zeros_like(raw)
    left[:, c:] = raw[:, :-c]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    # filters None, Sub and Up (their inverse is a vectorized sum); per row the one whose
    # residuals are smallest, the usual heuristic for what deflate compresses best
    options = np.stack([raw, raw - left, raw - up]) % 256
    cost = np.abs(options.astype(np.uint8).view(np.int8).astype(np.int32)).sum(axis=2)
    best = cost.argmin(axis=0)
    rows = options[best, np.arange(h)].astype(np.uint8)
    data = np.concatenate([best.astype(np.uint8)[:, None], rows], axis=1).tobytes()
    png = (
        _SIGNATURE
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, _COLOUR[c], 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(data, 9))
        + _chunk(b"IEND", b"")
    )
    return PNG_URI + base64.b64encode(png).decode("ascii")


def png_decode(uri: str, where: str) -> np.ndarray:
    """The pixels of a PNG data URI (what :func:`png_encode` writes): uint8, (C, H, W)."""

    def bad(why: str) -> InputError:
        return InputError(f"{where}: not an 8-bit greyscale or RGB PNG data URI ({why})")

    if not isinstance(uri, str) or not uri.startswith(PNG_URI):
        raise bad(f"expected a string starting {PNG_URI!r}")
    try:
        png = base64.b64decode(uri[len(PNG_URI) :], validate=True)
    except ValueError as e:
        raise bad(f"base64: {e}") from None
    if not png.startswith(_SIGNATURE):
        raise bad("no PNG signature")
    pos, header, idat = len(_SIGNATURE), None, []
    while pos + 12 <= len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n : pos + 12 + n] or b"\0\0\0\0")
        if len(body) != n or crc != zlib.crc32(kind + body):
            raise bad(f"chunk {kind!r} is truncated or corrupt")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    else:
        raise bad("no IEND chunk: the file is truncated")
    if header is None:
        raise bad("no IHDR chunk")
    w, h, depth, colour, _, _, interlace = header
    channels = {v: k for k, v in _COLOUR.items()}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise bad(f"bit depth {depth}, colour type {colour}, interlace {interlace}")
    try:
        data = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise bad(f"deflate: {e}") from None
    stride = w * channels
    if data.size != h * (stride + 1):
        raise bad(f"{data.size} bytes of image data for {w}x{h}x{channels}")
    rows = data.reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for i in range(h):
        filt, line = int(rows[i, 0]), rows[i, 1:].astype(np.int64)
        if filt == 0:
            cur = line
        elif filt == 1:  # Sub: a running sum along the row, per channel
            cur = line.reshape(w, channels).cumsum(axis=0).reshape(-1)
        elif filt == 2:
            cur = line + prev
        elif filt in (3, 4):  # Average, Paeth: each byte needs the one before it
            cur = np.zeros(stride, dtype=np.int64)
            for j in range(stride):
                a = int(cur[j - channels]) if j >= channels else 0
                b = int(prev[j])
                if filt == 3:
                    cur[j] = (line[j] + (a + b) // 2) % 256
                    continue
                c_ = int(prev[j - channels]) if j >= channels else 0
                p = a + b - c_
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c_)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c_
                cur[j] = (line[j] + pred) % 256
        else:
            raise bad(f"row {i} has filter type {filt}")
        cur = cur % 256
        out[i] = cur
        prev = cur
    return np.ascontiguousarray(out.reshape(h, w, channels).transpose(2, 0, 1))
