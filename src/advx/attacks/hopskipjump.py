"""HopSkipJumpAttack (Chen, Jordan & Wainwright, IEEE S&P 2020): label-only, minimum-norm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._tensor import flat, per_sample
from .._validate import nonneg_float, one_of, positive_int
from ..errors import InputError
from ..threat import L2, ThreatModel
from ._base import Attack, Problem, RunOutput
from ._decision import Search, draw, sample_generators
from ._registry import register

KEY_GRAD = 0x4A51
# Most random rows of one gradient-estimation pass, counted in input elements (memory cap).
_CHUNK_ELEMENTS = 1 << 24
# Step-size halvings tried per iteration before the iteration gives up (the step is then 0).
_MAX_HALVINGS = 30


@register("hopskipjump")
@dataclass(kw_only=True, eq=False)
class HopSkipJump(Attack):
    """Walk along the decision boundary using gradient directions estimated from labels alone.

    Each iteration, per sample: estimate the direction of the boundary's normal at the current
    boundary point from the labels of ``B_t = gradient_queries * sqrt(t)`` random perturbations
    of size ``delta_t`` (Monte-Carlo estimate with a baseline), step along it (L2) or its sign
    (Linf) by a size found by geometric halving from ``dist / sqrt(t)`` (or a log grid), then
    bisect back to the boundary. Every sample stops at its own ``max_queries`` (the clean check
    aside) or at the model's budget, whichever comes first; with a finite eps, also as soon as
    its point is inside the ball.

    ``init="noise"`` starts from noise in the bounds that is adversarial: uniform, then smooth
    low-frequency noise that reaches more classes (up to 100 tries per sample, one query each);
    ``init="pool"`` from another image of the batch with another label (or the target's), which
    makes the result depend on the batch. Either start is bisected to the boundary; a sample
    with no start fails. The result's ``trace`` holds ``checkpoints`` (query counts, the clean
    check aside) and ``distance`` (N, K): the best distance after ``checkpoints[k]`` queries
    (``inf`` while none is adversarial, NaN for samples misclassified from the start).
    """

    threat: ThreatModel = field(default_factory=lambda: L2(math.inf), kw_only=False)
    max_queries: int = 10_000
    gradient_queries: int = 100
    max_gradient_queries: int = 10_000
    gamma: float = 1.0
    stepsize_search: str = "geometric"
    init: str = "noise"

    norms = ("l2", "linf")
    minimum_norm = True
    access = "labels"

    def _check(self) -> None:
        positive_int(self.max_queries, name="max_queries", who="HopSkipJump")
        positive_int(self.gradient_queries, name="gradient_queries", who="HopSkipJump")
        positive_int(self.max_gradient_queries, name="max_gradient_queries", who="HopSkipJump")
        nonneg_float(self.gamma, name="gamma", who="HopSkipJump")
        if self.gamma == 0:
            raise InputError("HopSkipJump: gamma must be > 0")
        one_of(
            self.stepsize_search, ("geometric", "grid"), name="stepsize_search", who="HopSkipJump"
        )
        one_of(self.init, ("noise", "pool"), name="init", who="HopSkipJump")

    def _run(self, p: Problem) -> RunOutput:
        s = Search(p, self.max_queries)
        theta = s.theta(self.gamma)
        x0, found = s.start_points(self.init)
        rows = found.nonzero().view(-1)
        cur = p.x.clone()
        cur_d = torch.full((len(p),), math.inf, dtype=p.x.dtype, device=p.x.device)
        cur[rows], cur_d[rows] = s.bisect(x0[rows], rows, theta)
        s.offer(rows, cur[rows], cur_d[rows])

        alive = found.clone()
        t = 0
        while True:
            alive &= s.searching()
            rows = alive.nonzero().view(-1)
            if rows.numel() == 0:
                break
            t += 1
            if t == 1:  # the first estimate probes at a tenth of the box, as in the authors' code
                lo, hi = p.threat.bounds
                delta = torch.full(
                    (rows.numel(),), 0.1 * (hi - lo), dtype=p.x.dtype, device=p.x.device
                )
            else:
                delta = (
                    s.dim * theta if p.threat.norm == "linf" else math.sqrt(s.dim) * theta
                ) * cur_d[rows]
            count = min(int(self.gradient_queries * math.sqrt(t)), self.max_gradient_queries)
            grad = self._gradient(s, rows, cur[rows], delta, count, t)
            update = grad.sign() if p.threat.norm == "linf" else grad
            if self.stepsize_search == "geometric":
                self._geometric_step(s, rows, cur, cur_d, update, t, theta)
            else:
                self._grid_step(s, rows, cur, cur_d, update, theta)
        return s.result()

    def _gradient(
        self, s: Search, rows: Tensor, x: Tensor, delta: Tensor, count: int, t: int
    ) -> Tensor:
        """Monte-Carlo estimate of the boundary normal at the points ``x`` (R, ...) from the labels
        of ``count`` random perturbations each (fewer where a sample's budget is short)."""
        lo, hi = s.p.threat.bounds
        shape, d = tuple(x.shape[1:]), s.dim
        n_i = torch.minimum(s.left()[rows], torch.tensor(count, device=x.device))
        grad = torch.zeros(len(rows), d, dtype=x.dtype, device=x.device)
        per_chunk = max(1, _CHUNK_ELEMENTS // max(1, count * d))
        for c in range(0, len(rows), per_chunk):
            sl = slice(c, c + per_chunk)
            if int(n_i[sl].max()) <= 0:
                continue
            # always `count` draws per sample, so that its directions never depend on the others
            m = count
            rng = s.p.rng.select(rows[sl])
            gens = sample_generators(rng, KEY_GRAD, t, device=x.device)
            if s.p.threat.norm == "linf":
                u = 2 * draw(gens, "uniform", (m, d), x.dtype, x.device) - 1
            else:
                u = draw(gens, "normal", (m, d), x.dtype, x.device)
            u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)  # (C, m, D) unit directions
            base = flat(x[sl]).unsqueeze(1)  # (C, D) -> (C, 1, D)
            dl = delta[sl].view(-1, 1, 1)
            pert = (base + dl * u).clamp(lo, hi)
            u = (pert - base) / dl  # the direction actually taken, after clipping
            valid = torch.arange(m, device=x.device).view(1, -1) < n_i[sl].view(-1, 1)  # (C, m)
            owner = rows[sl].view(-1, 1).expand(-1, m)[valid]
            adv = s.is_adv(pert[valid].view(-1, *shape), owner)
            f = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
            f[valid] = adv.to(x.dtype) * 2 - 1  # +1 adversarial, -1 not
            k = n_i[sl].clamp(min=1).to(x.dtype).view(-1, 1)
            mean = f.sum(dim=1, keepdim=True) / k
            # baseline: subtract the mean vote (variance reduction), unless all votes agree
            unanimous = (mean.abs() == 1).view(-1, 1)
            weight = torch.where(unanimous, mean.expand_as(f), f - mean) * valid
            grad[sl] = (weight.unsqueeze(2) * u).sum(dim=1) / k
        grad = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return grad.view(len(rows), *shape)

    def _geometric_step(
        self,
        s: Search,
        rows: Tensor,
        cur: Tensor,
        cur_d: Tensor,
        update: Tensor,
        t: int,
        theta: float,
    ) -> None:
        """Halve the step from dist / sqrt(t) until the moved point is adversarial; bisect back."""
        lo, hi = s.p.threat.bounds
        eps = cur_d[rows] / math.sqrt(t)
        moved = cur[rows].clone()
        ok = torch.zeros(len(rows), dtype=torch.bool, device=cur.device)
        searching = torch.ones_like(ok)
        for _ in range(_MAX_HALVINGS):
            searching &= s.left()[rows] > 0
            idx = searching.nonzero().view(-1)
            if idx.numel() == 0:
                break
            cand = (cur[rows[idx]] + per_sample(eps[idx], update[idx]) * update[idx]).clamp(lo, hi)
            adv = s.is_adv(cand, rows[idx])
            moved[idx[adv]] = cand[adv]
            ok[idx[adv]] = True
            searching[idx[adv]] = False
            eps[idx[~adv]] /= 2
        self._rebound(s, rows[ok], moved[ok], cur, cur_d, theta)

    def _grid_step(
        self, s: Search, rows: Tensor, cur: Tensor, cur_d: Tensor, update: Tensor, theta: float
    ) -> None:
        """Try 20 step sizes dist * 10^[-4..0] at once; bisect back from each adversarial one and
        keep the closest result."""
        lo, hi = s.p.threat.bounds
        g = 20
        keep = s.left()[rows] >= g  # the grid is all or nothing
        rows, update = rows[keep], update[keep]
        if rows.numel() == 0:
            return
        scales = torch.logspace(-4, 0, g, dtype=cur.dtype, device=cur.device)
        eps = (cur_d[rows].view(-1, 1) * scales.view(1, -1)).reshape(-1)  # (R, g) -> (R*g,)
        owner = rows.repeat_interleave(g)
        step = update.repeat_interleave(g, dim=0)
        cand = (cur[owner] + per_sample(eps, step) * step).clamp(lo, hi)
        adv = s.is_adv(cand, owner)
        if not bool(adv.any()):
            return
        owner = owner[adv]
        points, d = s.bisect(cand[adv], owner, theta)
        # per sample, the first of its bisected candidates that reaches the smallest distance
        best = torch.full((len(s.p),), math.inf, dtype=d.dtype, device=d.device)
        best.scatter_reduce_(0, owner, d, reduce="amin")
        hit = (d == best[owner]).nonzero().view(-1)
        first = torch.full((len(s.p),), len(d), dtype=torch.long, device=d.device)
        first.scatter_reduce_(0, owner[hit], hit, reduce="amin")
        win = first[first < len(d)]
        self._accept(s, owner[win], points[win], d[win], cur, cur_d)

    def _rebound(
        self, s: Search, rows: Tensor, moved: Tensor, cur: Tensor, cur_d: Tensor, theta: float
    ) -> None:
        if rows.numel():
            points, d = s.bisect(moved, rows, theta)
            self._accept(s, rows, points, d, cur, cur_d)

    @staticmethod
    def _accept(
        s: Search, rows: Tensor, points: Tensor, d: Tensor, cur: Tensor, cur_d: Tensor
    ) -> None:
        """The new boundary points become the iterates (as in the paper, even when farther)."""
        cur[rows], cur_d[rows] = points, d
        s.offer(rows, points, d)
