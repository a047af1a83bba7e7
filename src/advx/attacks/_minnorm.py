"""Pieces the gradient-based minimum-norm attacks (DDN, FMN, DeepFool) share."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._tensor import per_sample
from ..errors import InputError
from ..threat import ThreatModel
from ._base import Problem
from ._best import Best

__all__ = [
    "closer_on_ray",
    "cosine",
    "farthest",
    "live_rows",
    "need_two_classes",
    "without_done",
]


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


def without_done(
    best: Best, rows: Tensor, q: Problem, *per_row: Tensor
) -> tuple[Tensor, Problem, tuple[Tensor, ...]]:
    """Drop the samples whose search is over (a success inside a finite eps) from a loop's
    ``rows``, its problem ``q`` and its per-row tensors; all returned as they are when none
    is."""
    go = (~best.done(rows)).nonzero().view(-1)
    if go.numel() == rows.numel():
        return rows, q, per_row
    return rows[go], q.select(go), tuple(t[go] for t in per_row)


def need_two_classes(p: Problem, who: str) -> None:
    if p.num_classes < 2:
        raise InputError(
            f"{who}: the model gives {p.num_classes} class(es); a minimum-norm attack needs at "
            "least 2 (a boundary to cross)"
        )


def closer_on_ray(p: Problem, best: Best, steps: int, *, near: float = 0.1) -> None:
    """Bisect the segment from each clean input to its closest adversarial point for where it
    crosses the boundary (``steps`` forward passes) and offer the adversarial end of the last
    bracket to ``best``.

    The radius of DDN and FMN hops by ``1 -+ gamma`` around the boundary, so the closest point
    they visit lies up to a few percent outside it along its own direction. The first pass
    tests the fraction ``1 - near`` of the segment: if that point is not adversarial, the rest
    bisect [1 - near, 1] (8 passes: to 0.08% of the distance); if it is, they bisect [0, 1 -
    near]. The segment lies in the box (both ends do), so no clipping.
    """
    rows = best.found.nonzero().view(-1)
    if steps <= 0 or rows.numel() == 0:
        return
    q = p.select(rows)
    delta = best.x.index_select(0, rows) - q.x
    lo = torch.zeros(rows.numel(), dtype=delta.dtype, device=delta.device)
    hi = torch.ones_like(lo)
    for k in range(steps):
        t = torch.full_like(lo, 1 - near) if k == 0 else (lo + hi) / 2
        adv = q.is_adversarial(q.model.logits(q.x + per_sample(t, delta) * delta))
        hi = torch.where(adv, t, hi)
        lo = torch.where(adv, lo, t)
    edge = q.x + per_sample(hi, delta) * delta
    best.offer(rows, edge, q.threat.distance(edge, q.x))
