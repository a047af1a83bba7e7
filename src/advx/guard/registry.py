"""Detectors by name, so that a policy file can say which ones it was calibrated with and a
guard can be rebuilt from the file alone.

A spec is a small dict: ``{"kind": "feature_squeezing", "squeezers": ["bits:1", "median:2"]}``.
:func:`build_detector` turns a spec into a detector for a model; :func:`spec_of` does the
reverse for a detector in hand (``None`` when it cannot be written down, e.g. a squeezer given
as a Python function).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from ..defenses.detectors import Detector, EnsembleDisagreement, FeatureSqueezing
from ..defenses.ensemble import Ensemble
from ..errors import InputError
from ..models._base import Model
from .scores import EnergyScore, LowConfidence, MaxLogitScore

__all__ = ["DETECTORS", "register_detector", "build_detector", "build_detectors", "spec_of"]

Factory = Callable[..., Detector]

# name -> (factory(model, **params), the params it accepts, one line for --help and errors)
DETECTORS: dict[str, tuple[Factory, tuple[str, ...], str]] = {}


def register_detector(name: str, factory: Factory, params: Sequence[str], doc: str) -> None:
    """Make ``factory(model, **params)`` available to policies under ``name``."""
    if name in DETECTORS:
        raise ValueError(f"detector {name!r} is registered twice")
    DETECTORS[name] = (factory, tuple(params), doc)


def _feature_squeezing(model: Model, squeezers: Sequence[str] = ("bits:1", "median:2")):
    return FeatureSqueezing(model, squeezers=list(squeezers))


def _ensemble_disagreement(model: Model):
    # the members cannot be named in a flat file: the guard's model itself must be the ensemble
    if not isinstance(model, Ensemble):
        raise InputError(
            "detector 'ensemble_disagreement' needs the guarded model to be an "
            f"advx.defenses.Ensemble, got {type(model).__name__}; guard an Ensemble of your "
            "members, or choose another detector"
        )
    return EnsembleDisagreement(model)


register_detector(
    "feature_squeezing",
    _feature_squeezing,
    ("squeezers",),
    "prediction change under bit-depth reduction and median smoothing (Xu et al. 2018)",
)
register_detector(
    "ensemble_disagreement",
    _ensemble_disagreement,
    (),
    "disagreement between the members of an Ensemble (the guarded model)",
)
register_detector(
    "energy",
    lambda model, temperature=1.0: EnergyScore(model, temperature=temperature),
    ("temperature",),
    "free energy of the logits, an out-of-distribution score (Liu et al. 2020)",
)
register_detector(
    "max_logit",
    MaxLogitScore,
    (),
    "minus the largest logit, an out-of-distribution score (Hendrycks et al. 2022)",
)
register_detector("low_confidence", LowConfidence, (), "one minus the top softmax probability")


def build_detector(spec: dict[str, Any] | str, model: Model, *, who: str = "detector") -> Detector:
    """The detector a spec describes, for ``model``; a bare name takes the defaults."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise InputError(f"{who}: expected a table with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind not in DETECTORS:
        raise InputError(
            f"{who}: unknown detector kind {kind!r}; known: {', '.join(sorted(DETECTORS))}"
            + (
                " (a custom detector cannot be rebuilt from a file: build the Guard with "
                "detectors= and guard.use(policy))"
                if kind == "custom"
                else ""
            )
        )
    factory, params, _ = DETECTORS[kind]
    kw = {k: v for k, v in spec.items() if k != "kind"}
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise InputError(
            f"{who}: detector {kind!r} takes {list(params) or 'no parameters'}, got {unknown}"
        )
    try:
        return factory(model, **kw)
    except InputError as e:
        raise InputError(f"{who}: {e}") from None


def build_detectors(names: str | Sequence[str], model: Model) -> dict[str, Detector]:
    """Detectors by name (``"feature_squeezing,energy"`` or a list), named by their kind."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: dict[str, Detector] = {}
    for name in names:
        if name in out:
            raise InputError(f"detectors: {name!r} is named twice")
        out[name] = build_detector(name, model, who="detectors")
    return out


def spec_of(detector: Detector, model: Model | None = None) -> dict[str, Any] | None:
    """The spec that rebuilds ``detector`` for ``model`` (the guard's), or ``None``."""
    if detector.model is not model and model is not None:
        # a detector watching another model (an extra ensemble, a surrogate) cannot be rebuilt
        # from the guarded model alone
        return None
    if isinstance(detector, FeatureSqueezing):
        written = all(
            isinstance(f, functools.partial) and re.fullmatch(r"(bits|median|jpeg):\d+", n)
            for n, f in zip(detector.names, detector.squeezers, strict=True)
        )
        if not written:
            return None  # a squeezer given as a function: code, not a spec
        return {"kind": "feature_squeezing", "squeezers": list(detector.names)}
    if isinstance(detector, EnsembleDisagreement):
        return {"kind": "ensemble_disagreement"}
    spec = getattr(detector, "spec", None)
    if callable(spec):
        return dict(spec())
    return None
