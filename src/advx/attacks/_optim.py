"""What CW and ZOO share: Adam's step and Carlini & Wagner's search over c, per sample.

Both are written once here so that the two attacks cannot drift apart: CW takes Adam steps on
its whole iterate with exact gradients, ZOO on a few coordinates per sample with finite
differences, and both search c the same way (x10 until a success, then bisection).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adam_step", "search_c"]

B1, B2, TINY = 0.9, 0.999, 1e-8


def adam_step(
    m: Tensor, v: Tensor, g: Tensor, t: Tensor, lr: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's moments after gradient ``g`` at step ``t`` (counted from 1, per entry or per row,
    broadcastable), and the update to subtract: ``lr * m_hat / (sqrt(v_hat) + 1e-8)``."""
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    return m, v, lr * (m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + TINY)


def search_c(
    c: Tensor, lo: Tensor, hi: Tensor, hit: Tensor, ran: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the search over c per sample: a search step that found an adversarial point
    (``hit``) makes c an upper bound, one that did not a lower bound; the next c is ten times
    larger while no upper bound is known, else the midpoint. Samples not in ``ran`` (bool; None:
    all of them) keep c and its bounds. Returns (c, lo, hi)."""
    ran = torch.ones_like(hit) if ran is None else ran
    hi = torch.where(ran & hit, torch.minimum(hi, c), hi)
    lo = torch.where(ran & ~hit, torch.maximum(lo, c), lo)
    c = torch.where(ran, torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2), c)
    return c, lo, hi
