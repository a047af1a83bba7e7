"""Suites: named cascades of attacks, built-in or read from a TOML file.

A suite is a list of attack specs (a registered name and its parameters). It is checked in full
-- every name known, every parameter accepted -- before any work starts.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import attacks
from .._rng import derive_seed
from ..errors import InputError
from ..threat import ThreatModel

__all__ = ["Suite", "SUITES", "load_suite"]


@dataclass(frozen=True)
class Suite:
    name: str
    specs: tuple[dict[str, Any], ...]  # each {"name": ..., **params}
    skip_unsupported: bool = (
        False  # built-ins drop attacks that lack the norm; custom suites refuse
    )

    def build(self, threat: ThreatModel, *, seed: int = 0) -> list[attacks.Attack]:
        """The attacks for ``threat``; stage k gets a seed derived from (seed, k)."""
        return [attack for attack, _ in self.stages(threat, seed=seed)]

    def stages(
        self, threat: ThreatModel, *, seed: int = 0
    ) -> list[tuple[attacks.Attack, float | None]]:
        """(attack, closest) for each stage: ``closest`` is the fraction of the samples still
        robust, nearest the decision boundary, that the stage runs on (None: all of them)."""
        built = []
        for k, spec in enumerate(self.specs):
            spec = dict(spec)
            name = spec.pop("name")
            closest = spec.pop("closest", None)
            if closest is not None and (
                isinstance(closest, bool)
                or not isinstance(closest, (int, float))
                or not 0 < closest <= 1
            ):
                raise InputError(
                    f"suite {self.name!r}: closest = {closest!r} for {name}; expected a fraction "
                    "in (0, 1] of the samples still robust (those with the smallest logit margins)"
                )
            cls = attacks.get(name)
            if threat.norm not in cls.norms:
                if self.skip_unsupported:
                    continue
                raise InputError(
                    f"suite {self.name!r}: attack {name} does not support the {threat.norm} norm "
                    f"(it supports {', '.join(cls.norms)})"
                )
            attack = attacks.create(name, threat, seed=derive_seed(seed, k), **spec)
            built.append((attack, None if closest is None else float(closest)))
        if not built:
            raise InputError(f"suite {self.name!r} has no attack for the {threat.norm} norm")
        return built

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attacks": [copy.deepcopy(s) for s in self.specs]}


# AutoAttack's "standard" recipe (Croce & Hein 2020): APGD-CE, APGD-T on the 9 most likely other
# classes, FAB-T on 9 classes, Square with 5,000 queries -- each only on the points still robust.
_STANDARD = (
    {"name": "apgd", "loss": "ce", "steps": 100, "restarts": 1},
    {"name": "apgd", "loss": "dlr-targeted", "steps": 100, "restarts": 1, "targets": 9},
    {"name": "fab", "targeted": True, "steps": 100, "restarts": 1, "targets": 9},
    {"name": "square", "queries": 5000, "p_init": 0.8},
)
# advx's cheaper cascade: the same kinds of attack, fewer target classes (the most likely ones
# carry almost all the successes), FAB-T dropped (it rarely finds a point APGD-T missed, and
# costs many passes per step), and Square with its full 5,000 queries but only on the 15% of the
# points still robust that the white-box stages brought closest to the boundary. On the TRADES
# SmallCNN every point Square broke after APGD-CE and APGD-T lay in the lowest 7% of margins,
# and most needed over 2,000 queries (benchmarks/RESULTS.md): fewer queries on every point
# would miss them, the full budget on the few close ones does not.
_FAST = (
    {"name": "apgd", "loss": "ce", "steps": 100, "restarts": 1},
    {"name": "apgd", "loss": "dlr-targeted", "steps": 100, "restarts": 1, "targets": 3},
    {"name": "square", "queries": 5000, "p_init": 0.8, "closest": 0.15},
)

SUITES: dict[str, Suite] = {
    "standard": Suite("standard", _STANDARD, skip_unsupported=True),
    "fast": Suite("fast", _FAST, skip_unsupported=True),
}


def load_suite(suite: str | Path | Suite | Sequence, threat: ThreatModel | None = None) -> Suite:
    """A built-in name, a path to a TOML file, a Suite, or a list of specs / attack objects."""
    if isinstance(suite, Suite):
        out = suite
    elif isinstance(suite, (list, tuple)):
        specs = []
        for item in suite:
            if isinstance(item, attacks.Attack):
                specs.append(
                    {"name": item.name, **{k: v for k, v in item.params.items() if k != "seed"}}
                )
            elif isinstance(item, dict) and "name" in item:
                specs.append(dict(item))
            else:
                raise InputError(
                    f"suite: expected attacks or {{'name': ..., params}} dicts, got {item!r}"
                )
        out = Suite("custom", tuple(specs))
    elif str(suite) in SUITES:
        out = SUITES[str(suite)]
    else:
        out = _from_toml(Path(str(suite)))
    if threat is not None:
        out.build(threat)  # every name and parameter checked now, before any work
    return out


def _from_toml(path: Path) -> Suite:
    if not path.exists():
        raise InputError(
            f"suite: {str(path)!r} is neither a built-in suite ({', '.join(SUITES)}) nor a TOML "
            "file"
        )
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"suite: {path} is not valid TOML ({e})") from None
    items = doc.get("attacks") or doc.get("attack")
    if not isinstance(items, list) or not items:
        raise InputError(
            f"suite: {path} needs an [[attacks]] table per attack, e.g.\n"
            '  [[attacks]]\n  name = "apgd"\n  loss = "ce"\n  steps = 100'
        )
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise InputError(f"suite: attack #{i + 1} in {path} has no name")
        attacks.get(item["name"])  # unknown names fail here, with the list of known ones
        specs.append(dict(item))
    return Suite(str(doc.get("name", path.stem)), tuple(specs))
