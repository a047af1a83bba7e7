"""Robust accuracy at every eps from one minimum-norm run: the curve people plot."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ._result import AttackResult

__all__ = ["robustness_curve"]

# Slack on "distance <= eps", the same as ThreatModel.contains: float rounding of x + delta.
_ATOL = 1e-5


def robustness_curve(
    result: AttackResult, eps_grid: Sequence[float] | Tensor
) -> tuple[Tensor, Tensor]:
    """``(eps, accuracy)``: at each eps of ``eps_grid``, the share of the samples the attack did
    not break within eps (float64 tensors of the grid's length, in its order).

    A sample counts as broken at eps when the attack succeeded at a distance <= eps, so points
    misclassified already (distance 0) are broken at every eps and the curve starts at the clean
    accuracy. One minimum-norm run (``threat.eps = inf``: DDN, FMN, DeepFool, FAB, CW) gives the
    whole curve; a run with a finite eps says nothing about a failure beyond that eps, so a grid
    that reaches past it is an error. For a targeted result the curve is the share of samples
    not sent to their target within eps.
    """
    if not isinstance(result, AttackResult):
        raise InputError(
            f"robustness_curve: result must be an AttackResult (what an attack returns), got "
            f"{type(result).__name__}"
        )
    try:
        grid = torch.as_tensor(eps_grid, dtype=torch.float64).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"robustness_curve: eps_grid must be a sequence of numbers >= 0, got {eps_grid!r}"
        ) from None
    if grid.numel() == 0 or bool(torch.isnan(grid).any()) or bool((grid < 0).any()):
        raise InputError(
            f"robustness_curve: eps_grid must hold numbers >= 0 (not NaN), at least one, got "
            f"{grid.tolist()}"
        )
    success = result.success.detach().cpu().view(-1, 1)  # (N, 1)
    distance = result.distance.detach().cpu().to(torch.float64).view(-1, 1)  # (N, 1)
    eps = grid.view(1, -1)  # (1, E)
    budget = result.threat.eps
    budget_t = (
        budget.detach().cpu().to(torch.float64)
        if isinstance(budget, Tensor)
        else torch.full((len(result),), float(budget), dtype=torch.float64)
    ).view(-1, 1)  # (N, 1)
    # a failure at a finite budget is only known up to it
    unknown = ~success & (eps > budget_t * (1 + _ATOL) + _ATOL)
    if bool(unknown.any()):
        limit = float(budget_t[~success].min()) if bool((~success).any()) else math.inf
        raise InputError(
            f"robustness_curve: the attack ran with eps {limit:g} on samples it did not break; "
            f"their robustness beyond it is unknown, but eps_grid reaches {float(grid.max()):g}. "
            "Keep the grid within the budget, or run a minimum-norm attack (eps = inf), e.g. "
            "advx.attacks.create('fmn', advx.Linf(math.inf))"
        )
    broken = success & (distance <= eps * (1 + _ATOL) + _ATOL)  # (N, E)
    accuracy = 1.0 - broken.to(torch.float64).mean(dim=0) if len(result) else grid * math.nan
    return grid, accuracy
