"""The audit's robust-accuracy-against-eps curve, on the first samples.

Two ways to get it. ``runs``: one fixed-eps attack (APGD-CE, 50 steps) per eps, the way
AutoAttack-style audits draw it. ``min-norm``: one minimum-norm attack (FMN, 100 steps, in the
threat's norm) whose per-sample distances give robust accuracy at every eps at once. Either way
each sample also counts as broken at every eps at or above the distance of the adversarial
example the cascade found for it: those examples are real, so the curve never claims a point
robust that the audit broke, and its value at the audited eps is never above the cascade's own
robust accuracy on the same samples. Both ways give upper bounds on the true robust accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import attacks
from .._rng import derive_seed
from ..errors import InputError
from ..threat import ThreatModel
from .checks import large_eps
from .runner import CascadeState

# "runs": eps0 x these, one attack each, plus the large eps
_RUNS_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# "min-norm": points are free once the distances are known
_MIN_NORM_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
_RUN_STEPS = 50  # APGD-CE per eps
_FMN_STEPS = 100
# slack on "distance <= eps", as robustness_curve and ThreatModel.contains: float rounding
_ATOL = 1e-5


def _cost(method: str, points: int) -> int:
    """Gradient steps per sample, at most: what the choice between the two ways weighs."""
    if method == "runs":
        return _RUN_STEPS * (points + 1)  # one run per eps, and one at the large eps
    return _FMN_STEPS + 1  # one run, plus the check of its last point


def choose_method(spec, norm: str) -> str:
    """``"runs"`` or ``"min-norm"`` for an ``eps_curve`` argument: the cheaper one for
    ``"auto"`` and for a list of eps (runs on a tie: a run at eps is the direct answer)."""
    if spec in ("runs", "min-norm"):
        return spec
    if "fmn" not in attacks.list_attacks(norm=norm):
        return "runs"
    points = len(_RUNS_GRID) if spec == "auto" else len(spec)
    return "min-norm" if _cost("min-norm", points) < _cost("runs", points) else "runs"


def _grid(spec, eps0: float, method: str) -> list[float]:
    if spec in ("auto", "runs", "min-norm"):
        return [eps0 * f for f in (_RUNS_GRID if method == "runs" else _MIN_NORM_GRID)]
    try:
        eps_list = [float(e) for e in spec]
    except (TypeError, ValueError):
        raise InputError(
            f"eps_curve: expected 'auto', 'runs', 'min-norm', a list of eps values or None, "
            f"got {spec!r}"
        ) from None
    if not eps_list or any(e < 0 or not math.isfinite(e) for e in eps_list):
        raise InputError(f"eps_curve: expected finite eps values >= 0, got {eps_list}")
    return sorted(set(eps_list))


def _within(distance: Tensor, eps: float) -> Tensor:
    return distance <= eps * (1 + _ATOL) + _ATOL


def _eps_curve(
    model, x, y, threat: ThreatModel, spec, full: CascadeState, *, seed: int, subset: int
) -> dict[str, Any]:
    """Robust accuracy against eps on the first ``subset`` samples (the fields of EpsCurve)."""
    eps0 = float(threat.eps)
    method = choose_method(spec, threat.norm)
    grid = _grid(spec, eps0, method)
    big = large_eps(threat, x)
    m = min(subset, x.shape[0])
    xs, ys = x[:m], y[:m]
    correct = full.clean_correct[:m].to(x.device)
    rows = correct.nonzero().view(-1)
    index = rows.clone()
    # the cascade's own adversarial examples: broken at every eps from their distance on
    cascade_d = full.distance[:m].to(torch.float64).cpu()
    cascade_d = torch.where(
        full.broken_by[:m] >= 0, cascade_d, torch.full_like(cascade_d, math.inf)
    )
    points = [*grid, big]
    broken = torch.zeros(m, len(points), dtype=torch.bool)  # (m, E + 1) by the curve's attack
    name: str
    if method == "min-norm":
        known = attacks.list_attacks(norm=threat.norm)
        name = next(a for a in ("fmn", "fab", "cw") if a in known)
        params: dict[str, Any] = {"steps": _FMN_STEPS} if name == "fmn" else {}
        attack_label = f"{name} ({_FMN_STEPS} steps)" if name == "fmn" else name
        if rows.numel():
            attack = attacks.create(
                name, threat.with_eps(math.inf), seed=derive_seed(seed, 7001), **params
            )
            r = attack(model, xs[rows], ys[rows], index=index)
            dist = torch.where(
                r.success.cpu(),
                r.distance.detach().cpu().double(),
                torch.full((rows.numel(),), math.inf, dtype=torch.float64),
            )
            for j, e in enumerate(points):
                broken[rows.cpu(), j] = _within(dist, e)
        how = f"min-norm {name}"
    else:
        name = "apgd" if "apgd" in attacks.list_attacks(norm=threat.norm) else "pgd"
        attack_label = f"{name}-ce ({_RUN_STEPS} steps)"
        for k, e in enumerate(points):
            if rows.numel() == 0:
                break
            attack = attacks.create(
                name, threat.with_eps(e), steps=_RUN_STEPS, seed=derive_seed(seed, 7000 + k)
            )
            r = attack(model, xs[rows], ys[rows], index=index)
            broken[rows.cpu(), k] = r.success.cpu()
        how = f"{name}-ce at eps"
    by_cascade = torch.stack([_within(cascade_d, e) for e in points], dim=1)  # (m, E + 1)
    correct_c = correct.cpu().view(-1, 1)
    robust = correct_c & ~(broken | by_cascade)
    only_cascade = (correct_c & by_cascade & ~broken).sum(dim=0)  # (E + 1,)
    acc = (robust.double().sum(dim=0) / max(m, 1)).tolist()
    # the cascade's verdict on these samples at the audited eps, and what the curve's attack
    # broke within it that the cascade did not (the headline then overstates robustness)
    cascade_robust = correct.cpu() & ~_within(cascade_d, eps0)
    if method == "min-norm" and rows.numel():
        at_eps0 = cascade_robust & _within_rows(dist, rows.cpu(), m, eps0)
    elif method == "runs" and any(math.isclose(e, eps0, rel_tol=1e-6) for e in grid):
        at = next(j for j, e in enumerate(grid) if math.isclose(e, eps0, rel_tol=1e-6))
        at_eps0 = cascade_robust & broken[:, at]
    else:  # no run at the audited eps: nothing to compare
        at_eps0 = torch.zeros(m, dtype=torch.bool)
    return {
        "eps": grid,
        "robust_accuracy": acc[:-1],
        "n": m,
        "attack": attack_label,
        "source": "minimum-norm" if method == "min-norm" else "runs",
        "large_eps": big,
        "robust_accuracy_large_eps": acc[-1],
        "check": True,
        "method": [how + (" + cascade" if int(c) else "") for c in only_cascade[:-1]],
        "from_cascade": [int(c) for c in only_cascade[:-1]],
        "robust_accuracy_cascade": float(cascade_robust.double().sum()) / max(m, 1),
        "broken_beyond_cascade": int(at_eps0.sum()),
    }


def _within_rows(dist: Tensor, rows: Tensor, m: int, eps: float) -> Tensor:
    """(m,) bool: the attacked ``rows`` whose distance is within ``eps``."""
    out = torch.zeros(m, dtype=torch.bool)
    out[rows] = _within(dist, eps)
    return out
