"""The attack registry: every attack registers a name; the CLI, config files and tests read it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InputError

if TYPE_CHECKING:
    from ..threat import ThreatModel
    from ._base import Attack

__all__ = ["register", "create", "list_attacks", "get", "info"]

_REGISTRY: dict[str, type[Attack]] = {}
A = TypeVar("A", bound="type[Attack]")


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make an attack available as ``create(name, ...)``."""

    def wrap(cls: A) -> A:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise RuntimeError(
                f"attack name {key!r} is already registered by {_REGISTRY[key].__qualname__}"
            )
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return wrap


def get(name: str) -> type[Attack]:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InputError(f"unknown attack {name!r}; registered attacks: {known}") from None


def create(name: str, threat: ThreatModel | None = None, **params: Any) -> Attack:
    """Build a registered attack: ``create("pgd", Linf(0.3), steps=40)``."""
    cls = get(name)
    try:
        return cls(threat, **params) if threat is not None else cls(**params)
    except TypeError as e:
        raise InputError(f"{name}: {e}; its parameters are {sorted(cls.param_names())}") from None


def list_attacks(*, access: str | None = None, norm: str | None = None) -> list[str]:
    """Names of the registered attacks, optionally only those that need at most ``access``
    ("gradients", "scores", "labels") or support ``norm``."""
    from ..models._base import ACCESS_RANK

    names = []
    for key, cls in sorted(_REGISTRY.items()):
        if access is not None and ACCESS_RANK[cls.access] > ACCESS_RANK[access]:
            continue
        if norm is not None and norm not in cls.norms:
            continue
        names.append(key)
    return names


def info(name: str) -> dict[str, Any]:
    """What the CLI's ``advx list`` shows about an attack."""
    cls = get(name)
    kind = {"gradients": "white-box", "scores": "score-based", "labels": "decision-based"}[
        cls.access
    ]
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": cls.name,
        "class": cls.__name__,
        "kind": kind,
        "norms": list(cls.norms),
        "minimum_norm": cls.minimum_norm,
        "targeted": cls.supports_targeted,
        "summary": doc[0] if doc else "",
    }
