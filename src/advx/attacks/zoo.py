"""ZOO: zeroth-order optimization black-box attack (Chen, Zhang, Sharma, Yi & Hsieh, AISec 2017).

Carlini & Wagner's L2 objective, ``||x - x0||^2 + c * f(x)``, minimized without gradients:
each iteration picks a few coordinates of the perturbation, estimates the objective's partial
derivatives along them with symmetric finite differences (2 queries per coordinate, all
candidates of all samples in one batched query), and takes a coordinate-wise Adam step on
each (ZOO-ADAM). Two devices of the paper make it usable within a few thousand queries:

* attack-space dimension reduction: the perturbation lives at a reduced resolution and is
  upsampled bilinearly to the input; when the objective stops decreasing at one resolution,
  the perturbation is carried over to twice the resolution (hierarchical attack);
* importance sampling: above the first resolution, coordinates are drawn with probability
  proportional to how much the perturbation already changed their region (8x8 regions per
  channel), so the queries go where the attack is happening.

Box constraint: by clipping (``x = clip(x0 + up(delta))``), not the tanh change of variables:
with the upsampled perturbation a tanh space would couple the box with the resolution, and on
MNIST-like inputs (most pixels exactly at a bound) tanh freezes those pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .._tensor import flat
from .._validate import nonneg_float, positive_int
from ..errors import InputError
from ..threat import L2, ThreatModel
from ._base import Attack, Problem, RunOutput
from ._losses import margin
from ._optim import adam_step, search_c
from ._registry import register

_REGIONS = 8  # importance sampling: the paper's 8x8 regions per channel


@register("zoo")
@dataclass(kw_only=True, eq=False)
class ZOO(Attack):
    """ZOO-ADAM with dimension reduction and importance sampling; a search over c per sample.

    Per sample: ``max_queries`` forward passes at most (the clean check included), split over
    ``search_steps`` values of c (C&W's rule: x10 until a success, then bisection; what a step
    leaves unspent goes to the next). The attack starts from the clean input with the
    perturbation at side ``resize``; when the objective stalls (down by less than 0.01% over
    ``stall_every`` iterations) a sample moves to twice the resolution, or, at the input's
    resolution, ends its search step. A new search step goes on from the perturbation the last
    one left, with fresh Adam moments and half the step size (C&W restart from scratch: under
    a query budget that would throw the spent queries away). Every candidate queried is a real
    point: the smallest adversarial one is kept, so no query is spent on the iterate itself.

    ``lr`` is 0.1 rather than the paper's 0.01, which needs hundreds of thousands of queries per
    image. With a finite eps a sample stops as soon as it has a success inside the ball.
    """

    threat: ThreatModel = field(default_factory=lambda: L2(math.inf), kw_only=False)
    max_queries: int = 10_000
    lr: float = 0.1
    coordinates: int = 128
    c: float = 1.0
    search_steps: int = 3
    kappa: float = 0.0
    resize: int | None = 8
    importance_sampling: bool = True
    h: float = 1e-4
    stall_every: int = 5

    access = "scores"
    norms = ("l2",)
    minimum_norm = True

    def _check(self) -> None:
        for name in ("max_queries", "coordinates", "search_steps", "stall_every"):
            positive_int(getattr(self, name), name=name, who="ZOO")
        for name in ("lr", "c", "kappa", "h"):
            nonneg_float(getattr(self, name), name=name, who="ZOO")
        if self.lr == 0 or self.c == 0 or self.h == 0:
            raise InputError("ZOO: lr, c and h must be > 0")
        if self.resize is not None:
            positive_int(self.resize, name="resize", who="ZOO")
        if not isinstance(self.importance_sampling, bool):
            raise InputError(
                f"ZOO: importance_sampling must be a bool, got {self.importance_sampling!r}"
            )

    # ---- attack space ------------------------------------------------------------------------
    def _sizes(self, x: Tensor) -> list[tuple[int, ...]]:
        """Shapes (per sample) of the perturbation at each resolution, coarsest first."""
        full = tuple(x.shape[1:])
        if x.dim() != 4 or self.resize is None:
            return [full]
        _, hgt, wid = full
        sizes, side = [], self.resize
        while side < max(hgt, wid):
            sizes.append((full[0], min(side, hgt), min(side, wid)))
            side *= 2
        return sizes + [full]

    @staticmethod
    def _up(delta: Tensor, full: tuple[int, ...]) -> Tensor:
        """(R, C, h, w) -> (R, C, H, W), bilinear; the identity at full resolution."""
        if tuple(delta.shape[1:]) == full:
            return delta
        return F.interpolate(delta, size=full[1:], mode="bilinear", align_corners=False)

    def _weights(self, delta: Tensor, level: int) -> Tensor:
        """Sampling weights of the coordinates, (R, D): uniform at the coarsest resolution, else
        the largest |delta| in each of the 8x8 regions of each channel (plus a floor, so that
        no coordinate is starved)."""
        r = delta.shape[0]
        if not self.importance_sampling or level == 0 or delta.dim() != 4:
            return delta.new_ones(r, delta[0].numel())
        size = delta.shape[2:]
        pooled = F.adaptive_max_pool2d(
            delta.abs(), (min(_REGIONS, size[0]), min(_REGIONS, size[1]))
        )
        w = flat(F.interpolate(pooled, size=size, mode="nearest"))  # (R, C, h, w) -> (R, D)
        return w + 0.1 * w.mean(dim=1, keepdim=True) + 1e-12

    # ---- the attack --------------------------------------------------------------------------
    def _run(self, p: Problem):
        x0, n = p.x, len(p)
        dev, dt = x0.device, x0.dtype
        lo, hi = p.threat.bounds
        full = tuple(x0.shape[1:])
        sizes = self._sizes(x0)
        top = len(sizes) - 1
        eps = p.threat.eps_tensor(x0)
        bounded = not p.threat.unbounded
        # A success found outside a finite ball is projected and re-scored by the base class:
        # keep one query for that.
        reserve = 1 if bounded else 0

        def inside(d: Tensor, rows: Tensor | None = None) -> Tensor:
            """A success inside a finite eps ends the sample's search; with eps inf (per-sample
            eps may mix both) only the budget does: inf <= inf must not count as done."""
            e = eps if rows is None else eps[rows]
            return torch.isfinite(e) & (d <= e)

        def left() -> Tensor:
            out = self.max_queries - p.model.queries
            if p.model.remaining is not None:
                out = torch.minimum(out, p.model.remaining)
            return out - reserve

        best = x0.clone()
        best_d = torch.full((n,), math.inf, device=dev, dtype=dt)
        c = torch.full((n,), float(self.c), device=dev, dtype=dt)
        c_lo, c_hi = torch.zeros_like(c), torch.full_like(c, math.inf)

        lr = torch.full((n,), float(self.lr), device=dev, dtype=dt)
        level = torch.zeros(n, dtype=torch.long, device=dev)
        delta = [x0.new_zeros(n, *sz) for sz in sizes]
        for s in range(self.search_steps):
            allowance = left() // (self.search_steps - s)  # what the earlier steps left, shared out
            spent = torch.zeros(n, dtype=torch.long, device=dev)
            # a new c changes the objective: fresh Adam moments, but the perturbation carries on
            adam = [(torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d)) for d in delta]
            steps = torch.zeros(n, dtype=torch.long, device=dev)  # iterations at the current level
            prev = torch.full((n,), math.inf, device=dev, dtype=dt)
            done = inside(best_d) if bounded else torch.zeros(n, dtype=torch.bool, device=dev)
            hit = torch.zeros(n, dtype=torch.bool, device=dev)
            t = 0
            while True:
                room = left()
                at = level.clone()  # a sample that moves up a resolution waits for the next round
                moved = False
                for j in range(top + 1):
                    rows = (~done & (at == j)).nonzero().view(-1)
                    if rows.numel() == 0:
                        continue
                    k = min(self.coordinates, delta[j][0].numel())
                    ok = (spent[rows] + 2 * k <= allowance[rows]) & (room[rows] >= 2 * k)
                    done[rows[~ok]] = True
                    rows = rows[ok]
                    if rows.numel() == 0:
                        continue
                    moved = True
                    center, adv_d, adv_x = self._step(
                        p.select(rows),
                        delta[j],
                        adam[j],
                        rows,
                        j,
                        k,
                        c[rows],
                        full,
                        lo,
                        hi,
                        (s, t),
                        lr[rows],
                    )
                    spent[rows] += 2 * k
                    # the smallest adversarial candidate of each sample
                    better = adv_d < best_d[rows]
                    best[rows[better]] = adv_x[better]
                    best_d[rows[better]] = adv_d[better]
                    hit[rows[torch.isfinite(adv_d)]] = True
                    if bounded:
                        done[rows[inside(best_d[rows], rows)]] = True
                    # C&W's early abort, per sample; below full resolution a stall moves the
                    # sample up one resolution instead (the paper's hierarchical attack)
                    steps[rows] += 1
                    due = steps[rows] % self.stall_every == 0
                    check, now = rows[due], center[due]
                    stalled = check[now > 0.9999 * prev[check]]
                    prev[check] = now
                    if j == top:
                        done[stalled] = True
                    elif stalled.numel():
                        delta[j + 1][stalled] = F.interpolate(
                            delta[j][stalled],
                            size=sizes[j + 1][1:],
                            mode="bilinear",
                            align_corners=False,
                        )
                        for a in adam[j + 1]:
                            a[stalled] = 0
                        level[stalled] = j + 1
                        steps[stalled] = 0
                        prev[stalled] = math.inf
                t += 1
                if not moved:
                    break
            # C&W's search over c, per sample (for the samples this step ran on), and half the
            # step size: the later steps refine a perturbation that exists
            ran = spent > 0
            c, c_lo, c_hi = search_c(c, c_lo, c_hi, hit, ran)
            lr = torch.where(ran, lr / 2, lr)
        found = torch.isfinite(best_d)
        return RunOutput(best, found & (best_d <= eps) if bounded else found)

    def _step(
        self,
        q: Problem,
        delta: Tensor,
        adam: tuple[Tensor, Tensor, Tensor],
        rows: Tensor,
        level: int,
        k: int,
        c: Tensor,
        full: tuple[int, ...],
        lo: float,
        hi: float,
        key: tuple[int, int],
        lr: Tensor,
    ):
        """One ZOO-ADAM iteration for the samples ``rows`` at one resolution, in place.

        Returns per sample: the objective at the iterate (the mean over its candidates, exact to
        O(h^2)), and the distance and point of its smallest adversarial candidate (inf if none).
        """
        r = rows.numel()
        d = flat(delta[rows])  # (R, C, h, w) -> (R, D)
        dim = d.shape[1]
        # k coordinates per sample without replacement, by weight (Gumbel top-k)
        u = q.rng.uniform(*key, shape=(dim,), dtype=torch.float64).to(d.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
        idx = (
            (self._weights(delta[rows], level).log().to(gumbel.dtype) + gumbel)
            .topk(k, dim=1)
            .indices
        )  # (R, k)
        # candidates delta +- h e_i: (R, 2k, D)
        bump = d.new_zeros(r, k, dim).scatter_(2, idx.unsqueeze(2), self.h)
        cand = d.unsqueeze(1) + torch.cat([bump, -bump], dim=1)
        x0 = q.x.unsqueeze(1).expand(r, 2 * k, *full).reshape(r * 2 * k, *full)
        xc = (x0 + self._up(cand.view(r * 2 * k, *delta.shape[1:]), full)).clamp(lo, hi)
        logits = q.model.logits(xc, rows=torch.arange(r, device=d.device).repeat_interleave(2 * k))
        labels = q.labels.repeat_interleave(2 * k)
        m = margin(F.log_softmax(logits, dim=1), labels, q.targeted)
        dist = flat(xc - x0).norm(dim=1)
        obj = (dist.square() + c.repeat_interleave(2 * k) * torch.clamp(-m, min=-self.kappa)).view(
            r, 2 * k
        )
        pred = logits.argmax(dim=1)
        adv = pred == labels if q.targeted else pred != labels
        if self.kappa > 0:
            adv &= m >= self.kappa
        adv_d, pick = (
            torch.where(adv, dist, torch.full_like(dist, math.inf)).view(r, 2 * k).min(dim=1)
        )
        adv_x = xc.view(r, 2 * k, *full)[torch.arange(r, device=d.device), pick]
        # coordinate-wise Adam on the symmetric finite differences
        g = (obj[:, :k] - obj[:, k:]) / (2 * self.h)  # (R, k)
        m1, m2, steps = (flat(a[rows]) for a in adam)
        tk = steps.gather(1, idx) + 1
        mk, vk, upd = adam_step(m1.gather(1, idx), m2.gather(1, idx), g, tk, lr.view(-1, 1))
        d = d.scatter(1, idx, d.gather(1, idx) - upd)
        delta[rows] = d.view(r, *delta.shape[1:])
        adam[0][rows] = m1.scatter(1, idx, mk).view(r, *delta.shape[1:])
        adam[1][rows] = m2.scatter(1, idx, vk).view(r, *delta.shape[1:])
        adam[2][rows] = steps.scatter(1, idx, tk).view(r, *delta.shape[1:])
        return obj.mean(dim=1), adv_d, adv_x
