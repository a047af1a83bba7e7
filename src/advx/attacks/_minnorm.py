"""Pieces the gradient-based minimum-norm attacks (DDN, FMN, DeepFool) share."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError
from ..threat import ThreatModel
from ._base import Problem

__all__ = ["cosine", "farthest", "live_rows", "need_two_classes"]


def cosine(k: int, steps: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` (k = 0) to ``end`` (k = steps)."""
    return end + (start - end) * (1 + math.cos(math.pi * k / max(1, steps))) / 2


def farthest(threat: ThreatModel, x: Tensor) -> Tensor:
    """(N,) the largest distance any point of the box lies from x, in the threat's norm: no
    radius beyond it can help, so it caps the radius a search may grow to."""
    lo, hi = threat.bounds
    corner = torch.where(x - lo > hi - x, torch.full_like(x, lo), torch.full_like(x, hi))
    return threat.distance(corner, x)


def live_rows(p: Problem) -> Tensor:
    """The samples worth attacking: those with a budget above 0 (eps 0 can never succeed)."""
    return (p.threat.eps_tensor(p.x) > 0).nonzero().view(-1)


def need_two_classes(p: Problem, who: str) -> None:
    if p.num_classes < 2:
        raise InputError(
            f"{who}: the model gives {p.num_classes} class(es); a minimum-norm attack needs at "
            "least 2 (a boundary to cross)"
        )
