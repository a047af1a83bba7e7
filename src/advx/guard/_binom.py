"""Binomial tails and Clopper-Pearson intervals, in plain math (scipy is only a test extra).

The guard states its guarantees with these: a false-positive rate with an exact interval, and a
selective risk bounded by a binomial tail test. The pmf is summed in log space (``lgamma``), so
n of a few hundred thousand costs a few milliseconds and never under- or overflows.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["binom_cdf", "binom_sf", "clopper_pearson"]


@functools.lru_cache(maxsize=16)
def _log_choose(n: int) -> np.ndarray:
    """log C(n, j) for j = 0..n (cached: an interval's bisection asks for the same n 120 times)."""
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])
    return log_fact[n] - log_fact - log_fact[::-1]


def _log_pmf(n: int, p: float) -> np.ndarray:
    """log P(X = j) for j = 0..n, X ~ Binomial(n, p), with 0 < p < 1."""
    j = np.arange(n + 1, dtype=np.float64)
    return _log_choose(n) + j * math.log(p) + (n - j) * math.log1p(-p)


def _log_sum(a: np.ndarray) -> float:
    if a.size == 0:
        return -math.inf
    m = float(a.max())
    return m + math.log(float(np.exp(a - m).sum()))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp = _log_pmf(n, p)
    # sum the smaller tail for accuracy, then complement
    if k < n * p:
        return min(1.0, math.exp(_log_sum(lp[: k + 1])))
    return max(0.0, 1.0 - math.exp(_log_sum(lp[k + 1 :])))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_cdf(k - 1, n, p) if k > 0 else 1.0


def _bisect(f, lo: float, hi: float, iters: int = 60) -> float:
    """The root of an increasing ``f`` on [lo, hi] (f(lo) <= 0 <= f(hi))."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval for a binomial proportion after ``k`` successes in ``n``
    trials (Clopper & Pearson, 1934): it covers the true rate with probability >= ``level``."""
    if n <= 0:
        return 0.0, 1.0
    a = (1.0 - level) / 2
    # lower: the p with P(X >= k; p) = a (increasing in p); upper: P(X <= k; p) = a (decreasing)
    lo = 0.0 if k == 0 else _bisect(lambda p: binom_sf(k, n, p) - a, 0.0, 1.0)
    hi = 1.0 if k == n else _bisect(lambda p: a - binom_cdf(k, n, p), 0.0, 1.0)
    return lo, hi
