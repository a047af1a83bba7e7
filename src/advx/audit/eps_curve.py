"""The audit's robust-accuracy-against-eps curve, on the first samples."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import attacks
from .._rng import derive_seed
from ..errors import InputError
from ..threat import ThreatModel
from .checks import large_eps
from .runner import CascadeState

_DEFAULT_CURVE = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _eps_curve(
    model, x, y, threat: ThreatModel, spec, full: CascadeState, *, seed: int, subset: int
) -> dict[str, Any]:
    """Robust accuracy against eps on the first ``subset`` samples."""
    eps0 = float(threat.eps)
    m = min(subset, x.shape[0])
    xs, ys = x[:m], y[:m]
    correct = full.clean_correct[:m].to(x.device)
    rows = correct.nonzero().view(-1)
    index = rows.clone()
    if spec == "min-norm":
        name = "fab" if "fab" in attacks.list_attacks(norm=threat.norm) else "cw"
        attack = attacks.create(name, threat.with_eps(math.inf), seed=derive_seed(seed, 7001))
        r = attack(model, xs[rows], ys[rows], index=index)
        dist = torch.full((m,), -1.0, dtype=torch.float64, device=x.device)
        dist[rows] = torch.where(
            r.success, r.distance.double(), torch.full_like(r.distance.double(), math.inf)
        )
        grid = [eps0 * f for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)]
        acc = [float((dist > e).float().mean()) for e in grid]
        return {
            "eps": grid,
            "robust_accuracy": acc,
            "n": m,
            "attack": name,
            "source": "minimum-norm",
            "check": False,
        }
    eps_list = [eps0 * f for f in _DEFAULT_CURVE] if spec == "auto" else [float(e) for e in spec]
    if any(e < 0 or not math.isfinite(e) for e in eps_list):
        raise InputError(f"eps_curve: expected finite eps values >= 0, got {eps_list}")
    eps_list = sorted(set(eps_list))
    name = "apgd" if "apgd" in attacks.list_attacks(norm=threat.norm) else "pgd"
    big = large_eps(threat, x)
    accs = []
    for k, e in enumerate(eps_list + [big]):
        if rows.numel() == 0:
            accs.append(0.0)
            continue
        attack = attacks.create(
            name, threat.with_eps(e), steps=50, seed=derive_seed(seed, 7000 + k)
        )
        r = attack(model, xs[rows], ys[rows], index=index)
        accs.append(float((~r.success).sum()) / m)
    return {
        "eps": eps_list,
        "robust_accuracy": accs[:-1],
        "n": m,
        "attack": f"{name} (50 steps)",
        "source": "runs",
        "large_eps": big,
        "robust_accuracy_large_eps": accs[-1],
    }
