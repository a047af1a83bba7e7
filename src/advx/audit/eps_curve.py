"""The audit's robust-accuracy-against-eps curve, on the first samples.

Each point is obtained one of three ways. ``min-norm fmn``: from one minimum-norm run (FMN, 100
steps, in the threat's norm) whose per-sample distances give every eps at once. ``cascade``: at
the audited eps, the cascade's own verdict on these samples. ``apgd-ce at eps``: one fixed-eps
run (APGD-CE, 50 steps) at that eps. The default (``"auto"``, "mixed" in the report) takes FMN
below the audited eps, the cascade at it and APGD-CE above it: measured on the TRADES SmallCNN
and the demo LeNet (benchmarks/bench_eps_curve.py), FMN matched APGD-CE below the audited eps
at a third of its cost (there APGD finds nothing and runs all its steps on every sample), but
sat far above it beyond (82% against 0% at 1.5 x eps on the SmallCNN), where APGD is cheap
because it stops on each sample it breaks. ``"runs"`` takes APGD-CE at every point,
``"min-norm"`` FMN at every point.

Whatever the way, every adversarial example found counts at every eps it fits in: the cascade's
(from its distance on), FMN's (idem), so the curve never claims a sample robust that the audit
broke, and its point at the audited eps is never above the cascade's robust accuracy on the same
samples. Every point is an upper bound on the true robust accuracy, like the headline.
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

# eps0 x these: "runs" (one attack each, plus the large eps) and the other two ways
_RUNS_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
_RUN_STEPS = 50  # APGD-CE per eps
_FMN_STEPS = 100
# slack on "distance <= eps", as robustness_curve and ThreatModel.contains: float rounding
_ATOL = 1e-5
_SPECS = ("auto", "runs", "min-norm")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def choose_method(spec, eps0: float, norm: str) -> str:
    """``"runs"``, ``"min-norm"`` or ``"mixed"`` for an ``eps_curve`` argument. ``"auto"``
    is mixed; so is a list of eps with at least two points below ``eps0`` (there one FMN run
    costs less than two APGD runs that break little and so run every step); otherwise runs."""
    if spec in ("runs", "min-norm"):
        return spec
    if "fmn" not in attacks.list_attacks(norm=norm):
        return "runs"
    if spec == "auto":
        return "mixed"
    below = [e for e in spec if e < eps0 and not _close(e, eps0)]
    return "mixed" if len(below) >= 2 else "runs"


def _grid(spec, eps0: float, method: str) -> list[float]:
    if spec in _SPECS:
        return [eps0 * f for f in (_RUNS_GRID if method == "runs" else _GRID)]
    return spec


def _checked_spec(spec):
    if isinstance(spec, str):
        if spec not in _SPECS:
            raise InputError(
                f"eps_curve: expected 'auto', 'runs', 'min-norm', a list of eps values or None, "
                f"got {spec!r}"
            )
        return spec
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


def _ways(method: str, points: list[float], eps0: float) -> list[str]:
    """The way of each point (the last one is the large eps): fmn, cascade or apgd."""
    if method == "runs":
        return ["apgd"] * len(points)
    if method == "min-norm":
        return ["fmn"] * len(points)
    return [
        "cascade" if _close(e, eps0) else "fmn" if e < eps0 else "apgd" for e in points[:-1]
    ] + ["apgd"]


def _eps_curve(
    model, x, y, threat: ThreatModel, spec, full: CascadeState, *, seed: int, subset: int
) -> dict[str, Any]:
    """Robust accuracy against eps on the first ``subset`` samples (the fields of EpsCurve)."""
    eps0 = float(threat.eps)
    spec = _checked_spec(spec)
    method = choose_method(spec, eps0, threat.norm)
    grid = _grid(spec, eps0, method)
    big = large_eps(threat, x)
    points = [*grid, big]
    ways = _ways(method, points, eps0)
    m = min(subset, x.shape[0])
    xs, ys = x[:m], y[:m]
    correct = full.clean_correct[:m].cpu()  # (m,)
    rows = correct.nonzero().view(-1)
    # the cascade's own adversarial examples: broken at every eps from their distance on
    cascade_d = full.distance[:m].to(torch.float64).cpu()
    cascade_d = torch.where(full.broken_by[:m].cpu() >= 0, cascade_d, math.inf)
    by_cascade = torch.stack([_within(cascade_d, e) for e in points], dim=1)  # (m, E + 1)
    by_fmn = torch.zeros(m, len(points), dtype=torch.bool)  # (m, E + 1)
    by_apgd = torch.zeros(m, len(points), dtype=torch.bool)
    fmn_name = next(a for a in ("fmn", "fab", "cw") if a in attacks.list_attacks(norm=threat.norm))
    apgd_name = "apgd" if "apgd" in attacks.list_attacks(norm=threat.norm) else "pgd"
    labels = []
    if "fmn" in ways and rows.numel():
        params: dict[str, Any] = {"steps": _FMN_STEPS} if fmn_name == "fmn" else {}
        attack = attacks.create(
            fmn_name, threat.with_eps(math.inf), seed=derive_seed(seed, 7001), **params
        )
        dev = x.device
        r = attack(model, xs[rows.to(dev)], ys[rows.to(dev)], index=rows.to(dev))
        dist = torch.where(r.success.cpu(), r.distance.detach().cpu().double(), math.inf)
        for j, e in enumerate(points):
            by_fmn[rows, j] = _within(dist, e)
        labels.append(f"{fmn_name} ({_FMN_STEPS} steps)" if fmn_name == "fmn" else fmn_name)
    for j, (e, way) in enumerate(zip(points, ways)):
        if way != "apgd":
            continue
        # only the samples no example found so far fits in: the others are broken at e already
        todo = rows[~(by_cascade[rows, j] | by_fmn[rows, j])]
        if todo.numel():
            attack = attacks.create(
                apgd_name, threat.with_eps(e), steps=_RUN_STEPS, seed=derive_seed(seed, 7000 + j)
            )
            dev = x.device
            r = attack(model, xs[todo.to(dev)], ys[todo.to(dev)], index=todo.to(dev))
            by_apgd[todo, j] = r.success.cpu()
    if "apgd" in ways:
        labels.append(f"{apgd_name}-ce ({_RUN_STEPS} steps)")
    correct_c = correct.view(-1, 1)
    robust = correct_c & ~(by_cascade | by_fmn | by_apgd)  # (m, E + 1)
    acc = (robust.double().sum(dim=0) / max(m, 1)).tolist()
    only_cascade = (correct_c & by_cascade & ~by_fmn & ~by_apgd).sum(dim=0)  # (E + 1,)
    primary = {
        "fmn": f"min-norm {fmn_name}",
        "cascade": "cascade",
        "apgd": f"{apgd_name}-ce at eps",
    }
    method_labels = []
    for j, way in enumerate(ways[:-1]):
        extra = []
        if way != "fmn" and bool((correct & by_fmn[:, j] & ~by_cascade[:, j]).any()):
            extra.append(f"min-norm {fmn_name}")  # it broke some the cascade did not
        if way != "cascade" and int(only_cascade[j]):
            extra.append("cascade")
        method_labels.append(" + ".join([primary[way], *extra]))
    # the cascade's verdict on these samples at the audited eps, and what the curve's attacks
    # broke within it that the cascade did not (the headline then overstates robustness)
    cascade_robust = correct & ~_within(cascade_d, eps0)
    at = [j for j, e in enumerate(grid) if _close(e, eps0)]
    beyond = int((cascade_robust & (by_fmn[:, at[0]] | by_apgd[:, at[0]])).sum()) if at else 0
    return {
        "eps": grid,
        "robust_accuracy": acc[:-1],
        "n": m,
        "attack": ", ".join(labels) if labels else "cascade",
        "source": {"runs": "runs", "min-norm": "minimum-norm", "mixed": "mixed"}[method],
        "large_eps": big,
        "robust_accuracy_large_eps": acc[-1],
        "check": True,
        "method": method_labels,
        "from_cascade": [int(c) for c in only_cascade[:-1]],
        "robust_accuracy_cascade": float(cascade_robust.double().sum()) / max(m, 1),
        "broken_beyond_cascade": beyond,
    }
