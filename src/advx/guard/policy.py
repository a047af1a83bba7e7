"""The guard's policy: which rule fires at which threshold, and what it then does.

A policy is a value: thresholds per detector, a confidence floor, the action of each rule, and
(once calibrated) the guarantees it was calibrated for and the fingerprint of the model it is
bound to. Its hash goes into every decision, so a decision can be traced to the policy that
made it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._io import atomic_open
from .._validate import check_choice, check_float
from ..errors import InputError
from .decision import ACTIONS, Action

__all__ = ["Policy"]


@dataclass(frozen=True)
class Policy:
    """``thresholds``: detector name -> score above which the input is flagged.
    ``min_confidence``: the model's top softmax probability below which the guard abstains.
    ``on_detect`` / ``on_low_confidence``: the action of each rule (the strictest firing rule
    wins). ``model_fingerprint``: the model the thresholds were calibrated for (``None``: any).
    ``guarantees`` and ``calibration`` record what calibration promised and on what data.
    ``detectors``: detector name -> its spec (see :mod:`advx.guard.registry`), so that
    :meth:`Guard.from_policy` can rebuild the guard from the file alone.

    Saved as TOML (:meth:`save`, :meth:`load`); the hash covers every field.
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    min_confidence: float = 0.5
    on_detect: Action = "review"
    on_low_confidence: Action = "abstain"
    model_fingerprint: str | None = None
    guarantees: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_float(self.min_confidence, name="min_confidence", low=0, high=1, who="Policy")
        for name in ("on_detect", "on_low_confidence"):
            check_choice(getattr(self, name), ACTIONS, name=name, who="Policy")
        for k, v in self.thresholds.items():
            # scores may be negative (an energy), never NaN
            check_float(v, name=f"thresholds[{k!r}]", who="Policy", low=None, allow_inf=True)
        unnamed = sorted(set(self.detectors) - set(self.thresholds))
        if unnamed:
            raise InputError(f"Policy: detectors {unnamed} have no threshold")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hash(self) -> str:
        """sha256 of the policy's canonical JSON, first 16 hex digits. Canonical: keys sorted,
        ``None`` values left out (as the file leaves them out), so a saved and loaded policy
        keeps its hash."""
        blob = json.dumps(
            _canonical(self.to_dict()), sort_keys=True, separators=(",", ":"), default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ---- the file ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as TOML, atomically (a reader never sees half a file)."""
        doc: dict[str, Any] = {"advx_policy": FORMAT, "hash": self.hash}
        doc.update(self.to_dict())
        with atomic_open(path, "w") as f:
            f.write("# advx guard policy: thresholds, guarantees, the model they fit\n")
            # a value TOML cannot hold fails here, half-written: the old file stays whole
            f.write(dumps_toml(doc))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Read a policy written by :meth:`save`; a missing, corrupt or foreign file is an
        :class:`~advx.errors.InputError` naming the path and what is wrong."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise InputError(f"policy: cannot read {path} ({e.strerror or e})") from None
        try:
            doc = _toml().loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"policy: {path} is not a text file (not UTF-8)") from None
        except Exception as e:  # tomllib.TOMLDecodeError, whichever module it came from
            raise InputError(f"policy: {path} is not valid TOML ({e})") from None
        try:
            return cls.from_dict(doc)
        except InputError as e:
            raise InputError(f"policy: {path}: {e}") from None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Policy:
        """A policy from the document :meth:`save` writes (keys checked, types checked)."""
        if doc.get("advx_policy") != FORMAT:
            raise InputError(
                f"not an advx policy file (expected advx_policy = {FORMAT}, got "
                f"{doc.get('advx_policy')!r}); write one with advx guard calibrate"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known - {"advx_policy", "hash"})
        if unknown:
            raise InputError(f"unknown keys {unknown}; expected some of {sorted(known)}")
        kw: dict[str, Any] = {}
        for name in known & set(doc):
            value = doc[name]
            want = _TYPES[name]
            if not isinstance(value, want) or isinstance(value, bool) and want is not bool:
                raise InputError(
                    f"{name} must be {_TYPE_WORDS[name]}, got {type(value).__name__} {value!r}"
                )
            kw[name] = value
        for name in ("thresholds", "detectors"):
            for k, v in kw.get(name, {}).items():
                ok = isinstance(v, dict) if name == "detectors" else _is_number(v)
                if not ok:
                    raise InputError(f"{name}.{k} must be {_TYPE_WORDS[name + '.']}, got {v!r}")
        if "thresholds" in kw:
            kw["thresholds"] = {k: float(v) for k, v in kw["thresholds"].items()}
        policy = cls(**kw)
        stored = doc.get("hash")
        if stored is not None and stored != policy.hash:
            raise InputError(
                f"the file's hash {stored!r} does not match its contents ({policy.hash}): it was "
                "edited by hand or damaged; recalibrate, or delete the hash line to accept the edit"
            )
        return policy


FORMAT = 1

_TYPES: dict[str, Any] = {
    "thresholds": dict,
    "min_confidence": (int, float),
    "on_detect": str,
    "on_low_confidence": str,
    "model_fingerprint": str,
    "guarantees": dict,
    "calibration": dict,
    "detectors": dict,
}
_TYPE_WORDS = {
    "thresholds": "a table of detector name = number",
    "thresholds.": "a number",
    "min_confidence": "a number in [0, 1]",
    "on_detect": f"one of {list(ACTIONS)}",
    "on_low_confidence": f"one of {list(ACTIONS)}",
    "model_fingerprint": "a sha256 hex string",
    "guarantees": "a table",
    "calibration": "a table",
    "detectors": "a table of detector specs",
    "detectors.": "a table with a 'kind'",
}


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj if v is not None]
    return obj


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


# ---- a TOML writer for the policy's plain structure: scalars, lists of scalars, nested tables --
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-trip form: 0.05, 1e-05, 12.0 are all valid TOML
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, where) for x in v if x is not None) + "]"
    raise TypeError(f"policy: cannot write {where} = {v!r} ({type(v).__name__}) as TOML")


def dumps_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """``doc`` as TOML: scalars first, then a ``[table]`` per nested dict. ``None`` values are
    left out (TOML has no null; the reader's default is ``None``)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in doc.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
            continue
        lines.append(f"{_key(k)} = {_value(v, prefix + k)}")
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{_key(k)}"
        text += f"\n[{name}]\n" + dumps_toml(v, prefix=name + ".")
    return text
