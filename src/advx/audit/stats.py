"""Confidence intervals for the accuracies of an audit and for the change between two audits.

A robust accuracy measured on 200 samples is a binomial proportion: 0.80 could well be 0.74 or
0.85. Every accuracy in a report carries its Wilson score interval (good coverage down to a
handful of samples, never outside [0, 1], not degenerate at 0 or 1 as the normal approximation
is); a change between two audits carries Newcombe's hybrid score interval, built from the two
Wilson intervals.
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["LEVEL", "wilson", "newcombe", "count_of"]

LEVEL = 0.95  # the confidence level of every interval advx reports


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(k: int, n: int, *, level: float = LEVEL) -> list[float]:
    """The Wilson score interval [low, high] for k successes in n trials (``[0, 1]`` for n = 0:
    no samples say nothing)."""
    if n <= 0:
        return [0.0, 1.0]
    if not 0 <= k <= n:
        raise ValueError(f"wilson: expected 0 <= k <= n, got k={k}, n={n}")
    z = _z(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or k = n one end is exactly 0 or 1; rounding noise must not move it
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return [round(low, 6), round(high, 6)]


def newcombe(
    k_base: int, n_base: int, k_new: int, n_new: int, *, level: float = LEVEL
) -> list[float]:
    """Newcombe's hybrid score interval for p_new - p_base (method 10 of Newcombe 1998).

    It treats the two proportions as independent; two audits of the same samples are positively
    correlated, so for them the interval is conservative (wider than it needs to be) -- a gate
    reading it errs on the side of calling a change noise.
    """
    p1, p2 = (k_base / n_base if n_base else 0.0), (k_new / n_new if n_new else 0.0)
    l1, u1 = wilson(k_base, n_base, level=level)
    l2, u2 = wilson(k_new, n_new, level=level)
    d = p2 - p1
    low = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return [round(max(-1.0, low), 6), round(min(1.0, high), 6)]


def count_of(fraction: float, n: int) -> int:
    """The number of samples behind a share of n (reports store shares, rounded to floats)."""
    return int(round(fraction * n))
