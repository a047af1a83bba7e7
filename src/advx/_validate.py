"""Checks of user input, written once. Each error names the argument, what was expected, what
came, and what to do. Tensor checks are a few reductions: cheap next to one forward pass.

Argument checks (cheap, at construction) share one message form::

    PGD: steps must be a positive int, got 0

``who`` names the object or function the argument belongs to (empty for a top-level argument).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

__all__ = [
    "check_images",
    "check_labels",
    "check_target",
    "check_index",
    "check_classes",
    "check_bounds",
    "check_int",
    "check_float",
    "check_choice",
    "check_bool",
    "positive_int",
    "nonneg_float",
    "positive_float",
    "one_of",
    "fail",
    "env_count",
]

# Inputs a hair outside the bounds (float rounding after a transform) are accepted and clipped.
_TOL = 1e-4


def check_images(x, bounds: tuple[float, float], *, name: str = "x") -> Tensor:
    """A float batch (N, ...) inside ``bounds``; returns it (clipped by float slack only)."""
    if not isinstance(x, Tensor):
        raise InputError(
            f"{name}: expected a torch.Tensor of shape (N, ...), got {type(x).__name__}"
        )
    if x.dim() < 2:
        raise InputError(
            f"{name}: expected a batch of shape (N, ...), got shape {tuple(x.shape)}; "
            f"add the batch dimension with {name}.unsqueeze(0)"
        )
    if not torch.is_floating_point(x):
        raise InputError(
            f"{name}: expected floating-point images in {list(bounds)}, got dtype {x.dtype}; "
            f"convert with {name}.float() / 255 for 8-bit images"
        )
    if x.numel() == 0:
        return x
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(dim=1).sum())
        raise InputError(
            f"{name}: {bad} sample(s) contain NaN or Inf; clean the data before attacking it"
        )
    lo, hi = bounds
    xmin, xmax = float(x.min()), float(x.max())
    if xmin < lo - _TOL or xmax > hi + _TOL:
        hint = ""
        if xmin < lo - _TOL and lo == 0.0 and xmin < -0.1:
            hint = (
                " -- it looks already normalized: pass the unnormalized image and declare "
                "mean/std on the Classifier"
            )
        elif xmax > hi + _TOL and hi == 1.0 and xmax > 1.5:
            hint = " -- it looks like 0-255 pixel values: divide by 255 or set bounds=(0, 255)"
        raise InputError(
            f"expected {name} in [{lo:g}, {hi:g}] (the classifier's bounds), got min {xmin:.4g} "
            f"and max {xmax:.4g}{hint}"
        )
    if xmin < lo or xmax > hi:
        x = x.clamp(lo, hi)
    return x


def check_labels(y, n: int, device: torch.device, *, name: str = "y") -> Tensor:
    """Integer labels of shape (N,) on ``device``."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError):
            raise InputError(
                f"{name}: expected integer class labels of shape ({n},), got {type(y).__name__}"
            ) from None
    if y.dim() == 2 and y.shape[1] > 1 and y.shape[0] == n:
        raise InputError(
            f"{name}: expected class indices of shape ({n},), got shape {tuple(y.shape)} "
            f"(one-hot?); convert with {name}.argmax(1)"
        )
    y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if y.dim() != 1 or y.shape[0] != n:
        raise InputError(
            f"{name}: expected shape ({n},) to match x's {n} samples, got shape {tuple(y.shape)}"
        )
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        if torch.is_floating_point(y) and bool((y == y.round()).all()):
            y = y.long()
        else:
            raise InputError(f"{name}: expected integer class indices, got dtype {y.dtype}")
    return y.to(device=device, dtype=torch.long)


def check_classes(y: Tensor, num_classes: int, *, name: str = "y") -> None:
    """Labels within [0, num_classes)."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(
            f"{name}: labels must lie in [0, {num_classes - 1}] (the model has {num_classes} "
            f"classes), got values from {lo} to {hi}"
        )


def check_target(target, y: Tensor, *, name: str = "target") -> Tensor | None:
    """Target classes (N,) for a targeted attack, each different from the true label."""
    if target is None:
        return None
    n = y.shape[0]
    if isinstance(target, int):
        target = torch.full((n,), target, dtype=torch.long, device=y.device)
    target = check_labels(target, n, y.device, name=name)
    same = target == y
    if bool(same.any()):
        first = int(same.nonzero()[0])
        raise InputError(
            f"{name}: {int(same.sum())} target(s) equal the true label (first at sample {first}); "
            "a targeted attack needs a different class -- see advx.attacks.random_targets"
        )
    return target


def check_index(index, n: int, device: torch.device) -> Tensor:
    """Global sample ids (N,) that key the random streams; defaults to 0..N-1."""
    if index is None:
        return torch.arange(n, device=device)
    index = torch.as_tensor(index, device=device)
    if index.dim() != 1 or index.shape[0] != n or torch.is_floating_point(index):
        raise InputError(f"index: expected {n} integer sample ids, got shape {tuple(index.shape)}")
    return index.long()


# ---- arguments ------------------------------------------------------------------------------
def fail(who: str, name: str, what: str, value: Any, hint: str = "") -> InputError:
    """The one form of an argument error: ``who: name must be what, got value; hint``."""
    prefix = f"{who}: " if who else ""
    return InputError(
        f"{prefix}{name} must be {what}, got {value!r}" + (f"; {hint}" if hint else "")
    )


def check_int(
    value: Any,
    *,
    name: str,
    who: str = "",
    low: int | None = 1,
    high: int | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> int | None:
    """An int (not a bool) in [low, high]; None passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if low == 1 and high is None:
            what = "a positive int"
        elif high is None:
            what = f"an int >= {low}"
        elif low is None:
            what = f"an int <= {high}"
        else:
            what = f"an int from {low} to {high}"
        raise fail(who, name, what + (" or None" if allow_none else ""), value, hint)
    return value


def check_float(
    value: Any,
    *,
    name: str,
    who: str = "",
    low: float | None = 0.0,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """A real number (not a bool, not NaN) in the interval given; returns it as a float."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        v = float(value)
        ok = (allow_inf or math.isfinite(v)) and (
            low is None or (v > low if low_open else v >= low)
        )
        ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        what = ("a number" if allow_inf else "a finite number") + (
            " " + " and ".join(parts) if parts else ""
        )
        raise fail(who, name, what + (" or None" if allow_none else ""), value, hint)
    return float(value)


def check_choice(value: Any, choices: Collection[Any], *, name: str, who: str = "") -> Any:
    if value not in choices:
        raise fail(who, name, f"one of {', '.join(map(repr, choices))}", value)
    return value


def check_bool(value: Any, *, name: str, who: str = "") -> bool:
    if not isinstance(value, bool):
        raise fail(who, name, "True or False", value)
    return value


def positive_int(value: Any, *, name: str, who: str = "") -> int:
    return check_int(value, name=name, who=who)  # type: ignore[return-value]


def positive_float(value: Any, *, name: str, who: str = "", allow_inf: bool = False) -> float:
    return check_float(value, name=name, who=who, low_open=True, allow_inf=allow_inf)  # type: ignore[return-value]


def nonneg_float(value: Any, *, name: str, who: str = "", allow_inf: bool = False) -> float:
    return check_float(value, name=name, who=who, allow_inf=allow_inf)  # type: ignore[return-value]


def one_of(value: Any, choices: Collection[Any], *, name: str, who: str = "") -> Any:
    return check_choice(value, choices, name=name, who=who)


def check_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """Input bounds (low, high), finite, low < high."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise InputError(f"bounds: expected (low, high), got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"bounds: expected finite low < high, got ({lo}, {hi})")
    return (lo, hi)


def env_count(name: str, *, what: str, one: str) -> int | None:
    """A whole number >= 1 from the environment variable ``name``; None when it is unset or
    empty. ``what`` names the unit (e.g. "iterations"), ``one`` what 1 means."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(
            f"{name}: must be a whole number of {what} >= 1 (1: {one}), got {raw!r}; unset it "
            "for the default"
        )
    return value
