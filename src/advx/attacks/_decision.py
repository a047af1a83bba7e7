"""Shared pieces of the decision-based (label-only) attacks: HopSkipJump and Boundary.

:class:`Search` holds the per-sample bookkeeping of a minimum-norm search that only sees labels:
the best adversarial point and its distance, each sample's query budget (``max_queries`` and the
model's own hard budget, whichever is smaller) and the query-efficiency trace.
``start_points`` finds a first adversarial point per sample (noise, or another sample of the
batch) and ``bisect`` walks a point back to the decision boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._rng import SampleRNG
from .._tensor import flat, per_sample
from ._base import Problem
from ._best import Best
from ._result import RunOutput

# Keys of the random draws (first element of every p.rng key), so that streams never collide.
KEY_NOISE, KEY_POOL = 0x1D01, 0x1D02
# Uniform-noise starting points tried per sample before giving up; pool candidates likewise.
NOISE_TRIES, POOL_TRIES = 100, 10
# The first noise tries are uniform; the others smooth (see Search._noise).
UNIFORM_TRIES = 10
# Coarse grid sizes of the smooth noise tries (see Search._noise).
_SMOOTH_GRIDS = (2, 3, 4, 6, 8, 12)
# Query counts at which the trace records the best distance (plus max_queries itself).
_CHECKPOINTS = (
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
)


def sample_generators(rng: SampleRNG, *key: int, device: torch.device) -> list[torch.Generator]:
    """One torch generator per sample, seeded from the sample's own stream of ``rng``.

    For the millions of Gaussian draws of the decision-based attacks: the hash RNG costs about
    a microsecond per normal draw, a generator a hundredth of that. Each sample's draws still
    depend only on (seed, sample index, key), never on the batch.
    """
    u = rng.uniform(*key, shape=(3,), dtype=torch.float64)  # 3 x 24 random bits per sample
    bits = (u * (1 << 24)).to(torch.long)
    seeds = (bits[:, 0] | (bits[:, 1] << 24) | ((bits[:, 2] & 0x7FFF) << 48)).tolist()
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        gens.append(g)
    return gens


def draw(
    gens: list[torch.Generator],
    kind: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``kind`` ("normal" or "uniform") draws of ``shape`` from each generator:
    (len(gens), *shape)."""
    fn = torch.randn if kind == "normal" else torch.rand
    if not gens:
        return torch.zeros(0, *shape, dtype=dtype, device=device)
    return torch.stack([fn(shape, generator=g, dtype=dtype, device=device) for g in gens])


def checkpoints(max_queries: int) -> list[int]:
    marks = [c for c in _CHECKPOINTS if c < max_queries]
    return marks + [max_queries]


class Search:
    """Per-sample state of a label-only minimum-norm search over the samples of ``p``.

    ``best``/``best_d`` hold the closest adversarial point seen (``inf``: none yet). Queries are
    counted from the start of the search (the clean check is not part of ``max_queries``); a
    sample never spends more than its ``limit``. With a finite eps, a sample is ``done`` once
    its best point is inside the ball: it costs nothing more.
    """

    def __init__(self, p: Problem, max_queries: int) -> None:
        n, dev = len(p), p.x.device
        self.p = p
        self.spent = p.model.queries.clone()  # the clean check
        limit = torch.full((n,), max_queries, dtype=torch.long, device=dev)
        remaining = p.model.remaining
        if remaining is not None:
            limit = torch.minimum(limit, remaining.to(dev).clamp(min=0))
        self.limit = limit
        # the closest adversarial point; with a finite eps a sample is done once inside it
        self.kept = Best.closest(p.x, p.threat.eps_tensor(p.x))
        self.marks = checkpoints(max_queries)
        self._marks = torch.tensor(self.marks, dtype=torch.long, device=dev)
        self.trace = torch.full((n, len(self.marks)), math.inf, dtype=p.x.dtype, device=dev)
        self.dim = flat(p.x).shape[1]

    @property
    def best(self) -> Tensor:
        """The closest adversarial point per sample, (N, ...) (the input while none)."""
        return self.kept.x

    @property
    def best_d(self) -> Tensor:
        """Its distance, (N,) (inf while none)."""
        return self.kept.score

    # ---- budget ----------------------------------------------------------------------------
    def used(self) -> Tensor:
        return self.p.model.queries - self.spent

    def left(self) -> Tensor:
        """Queries each sample may still spend, (N,)."""
        return self.limit - self.used()

    def searching(self) -> Tensor:
        """bool (N,): samples that may go on (budget left, nothing inside a finite eps yet)."""
        return (self.left() > 0) & ~self.kept.done()

    def affordable(self, owner: Tensor, active: Tensor) -> Tensor:
        """``active`` rows (one query each, ``owner`` their sample) whose sample can pay for all of
        its active rows; the others are dropped."""
        need = torch.bincount(owner[active], minlength=len(self.p))
        return active & (need <= self.left())[owner]

    # ---- queries ---------------------------------------------------------------------------
    def is_adv(self, x: Tensor, owner: Tensor) -> Tensor:
        """One labels query per row of ``x``, charged to its sample; bool (R,) adversarial."""
        pred = self.p.model.labels(x, rows=owner)
        if self.p.target is not None:
            return pred == self.p.target[owner]
        return pred != self.p.y[owner]

    def distance(self, x: Tensor, owner: Tensor) -> Tensor:
        return self.p.threat.distance(x, self.p.x[owner])

    def offer(self, owner: Tensor, x: Tensor, d: Tensor) -> None:
        """Adversarial points (one per distinct sample in ``owner``) that may beat the best;
        the trace records the improvements (no host sync)."""
        taken = self.kept.offer(owner, x, d)
        self.record(owner, taken)

    def record(self, rows: Tensor, taken: Tensor) -> None:
        """Where ``taken``, the best distance of sample ``rows`` now holds at every checkpoint at
        or above the queries spent so far (a later improvement overwrites those it reaches)."""
        reached = self._marks.view(1, -1) >= self.used()[rows].view(-1, 1)  # (R, K)
        reached &= taken.view(-1, 1)
        old = self.trace.index_select(0, rows)
        new = torch.where(reached, self.best_d.index_select(0, rows).view(-1, 1), old)
        self.trace.index_copy_(0, rows, new)

    def result(self) -> RunOutput:
        """``_run``'s result: samples with nothing inside the threat get the clean input back
        (no rescoring pass needed), so the budget holds exactly."""
        ok = self.kept.success
        x_adv = torch.where(_rows(ok, self.p.x), self.best, self.p.x)
        trace = {"checkpoints": list(self.marks), "distance": self.trace}
        return RunOutput(x_adv, ok, trace=trace)

    # ---- starting points -------------------------------------------------------------------
    def start_points(self, init: str) -> tuple[Tensor, Tensor]:
        """A first adversarial point per sample, (N, ...), and bool (N,) where one was found."""
        if init == "pool":
            return self._pool()
        return self._noise()

    def _noise(self) -> tuple[Tensor, Tensor]:
        """Noise in the bounds, tried until adversarial: uniform first (UNIFORM_TRIES), then (on
        images) smooth noise -- uniform on a coarse grid, upsampled, and raised to a random power
        or cut at a random level. Uniform noise falls into one or two classes on most models;
        smooth noise with random contrast reaches the others, which targeted attacks need
        (Brunner et al., 2019, use such low-frequency noise to guide the Boundary attack)."""
        p = self.p
        lo, hi = p.threat.bounds
        x0 = p.x.clone()
        found = torch.zeros(len(p), dtype=torch.bool, device=p.x.device)
        for r in range(NOISE_TRIES):
            rows = (~found & (self.left() >= 1)).nonzero().view(-1)
            if rows.numel() == 0:
                break
            cand = lo + (hi - lo) * self._noise_draw(p.rng.select(rows), r)
            adv = self.is_adv(cand, rows)
            x0[rows[adv]] = cand[adv]
            found[rows[adv]] = True
        return x0, found

    def _noise_draw(self, rng: SampleRNG, r: int) -> Tensor:
        """Try r of the noise, in [0, 1], shape (R, *input shape)."""
        x = self.p.x
        shape = tuple(x.shape[1:])
        if r < UNIFORM_TRIES or x.dim() != 4:
            return rng.uniform(KEY_NOISE, r, shape=shape, dtype=x.dtype).to(x.device)
        c, h, w = shape
        size = _SMOOTH_GRIDS[(r // 2) % len(_SMOOTH_GRIDS)]
        coarse = rng.uniform(KEY_NOISE, r, shape=(c, min(size, h), min(size, w)), dtype=x.dtype).to(
            x.device
        )
        smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).clamp(
            0, 1
        )
        u = rng.uniform(KEY_NOISE, r, 1, dtype=x.dtype).to(x.device).view(-1, 1, 1, 1)
        if r % 2:  # soft blobs: a random power in [1, 8]
            return smooth ** (1 + 7 * u)
        return (smooth > 0.5 + 0.45 * u).to(x.dtype)  # hard blobs: a random level in [0.5, 0.95]

    def _pool(self) -> tuple[Tensor, Tensor]:
        """Another sample of the batch whose label is another class (untargeted) or the target,
        chosen from the sample's own stream and checked with one query per try."""
        p = self.p
        n = len(p)
        x0 = p.x.clone()
        found = torch.zeros(n, dtype=torch.bool, device=p.x.device)
        if p.target is not None:
            eligible = p.y.view(1, -1) == p.target.view(-1, 1)  # (N, N): sample j may serve i
        else:
            eligible = p.y.view(1, -1) != p.y.view(-1, 1)
        for r in range(POOL_TRIES):
            count = eligible.sum(dim=1)
            rows = (~found & (count > 0) & (self.left() >= 1)).nonzero().view(-1)
            if rows.numel() == 0:
                break
            k = p.rng.select(rows).randint(KEY_POOL, r, high=count[rows])  # k-th eligible sample
            order = eligible[rows].to(torch.long).cumsum(dim=1) - 1  # rank of each eligible j
            pick = ((order == k.view(-1, 1)) & eligible[rows]).to(torch.long).argmax(dim=1)
            cand = p.x[pick]
            adv = self.is_adv(cand, rows)
            x0[rows[adv]] = cand[adv]
            found[rows[adv]] = True
            eligible[rows, pick] = False  # a candidate that failed is not tried again
        return x0, found

    # ---- back to the boundary -----------------------------------------------------------------
    def theta(self, gamma: float = 1.0) -> float:
        """HopSkipJump's binary-search tolerance: gamma / d^(3/2) (L2), gamma / d^2 (Linf), but
        no finer than 100 ulps of the input's dtype. A model's float arithmetic changes in the
        last bits with the batch it runs in (kernels pick tiles by batch size), so a label
        closer to the boundary than that is noise; resolving it only makes a sample's result
        depend on the rows it shared its queries with."""
        d = self.dim
        theta = gamma / (d * d) if self.p.threat.norm == "linf" else gamma / (d * math.sqrt(d))
        return max(theta, 100 * torch.finfo(self.p.x.dtype).eps)

    def bisect(self, x_adv: Tensor, owner: Tensor, theta: float) -> tuple[Tensor, Tensor]:
        """Per row, the point between the clean input and the adversarial ``x_adv`` that is still
        adversarial and closest to the input, up to a relative tolerance ``theta``.

        L2 moves along the segment (blend factor in [0, 1]); Linf shrinks the box around the input
        (radius in [0, ||x_adv - x||_inf]), as in HopSkipJump. A row whose sample runs out of
        queries stops where it is: its upper end is adversarial all along.
        """
        if owner.numel() == 0:
            return x_adv, x_adv.new_zeros(0)
        x = self.p.x[owner]
        linf = self.p.threat.norm == "linf"
        hi = (
            self.p.threat.distance(x_adv, x)
            if linf
            else torch.ones(len(owner), dtype=x.dtype, device=x.device)
        )
        hi0, lo = hi.clone(), torch.zeros_like(hi)
        tol = theta * hi.clamp(max=1.0)

        def at(alpha: Tensor, rows: Tensor) -> Tensor:
            a = per_sample(alpha, x[rows])
            if linf:
                return torch.minimum(torch.maximum(x_adv[rows], x[rows] - a), x[rows] + a)
            return x[rows] + a * (x_adv[rows] - x[rows])

        while True:
            active = self.affordable(owner, hi - lo > tol)
            rows = active.nonzero().view(-1)
            if rows.numel() == 0:
                break
            mid = (lo[rows] + hi[rows]) / 2
            adv = self.is_adv(at(mid, rows), owner[rows])
            hi[rows] = torch.where(adv, mid, hi[rows])
            lo[rows] = torch.where(adv, lo[rows], mid)
        out = at(hi, torch.arange(len(owner), device=x.device))
        # a row that never moved returns x_adv itself: at(hi) may differ from it by rounding
        out = torch.where(_rows(hi < hi0, out), out, x_adv)
        return out, self.distance(out, owner)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample bool (N,) broadcast against ``like`` (N, ...): (N,) -> (N, 1, ..., 1)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))
