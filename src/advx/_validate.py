"""Checks of user input, written once. Each error names the argument, what was expected, what
came, and what to do. Tensor checks are a few reductions: cheap next to one forward pass."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["check_images", "check_labels", "check_target", "check_index", "check_classes"]

# Inputs a hair outside the bounds (float rounding after a transform) are accepted and clipped.
_TOL = 1e-4


def check_images(x, bounds: tuple[float, float], *, name: str = "x") -> Tensor:
    """A floating-point batch (N, ...) inside ``bounds``; returns it (clipped by float slack only)."""
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
