"""FAB: the fast adaptive boundary attack (Croce & Hein, ICML 2020), a minimum-norm attack."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._tensor import flat, per_sample
from .._validate import nonneg_float, positive_int
from ..errors import InputError
from ._base import Attack, Problem, RunOutput
from ._best import Best
from ._lanes import Lanes, masked
from ._losses import other_max
from ._registry import register
from ._side import cascade, runs_at_once


def _pair_gap(logits: Tensor, cls: Tensor, ref: Tensor) -> Tensor:
    """f_cls - f_ref per row: >= 0 once the row has crossed the boundary between the two."""
    return (logits.gather(1, cls.view(-1, 1)) - logits.gather(1, ref.view(-1, 1))).view(-1)


def _target_gap(logits: Tensor, target: Tensor) -> Tensor:
    """f_target - max of the other logits: >= 0 once the row is classified as the target."""
    return logits.gather(1, target.view(-1, 1)).view(-1) - other_max(logits, target)


def project_hyperplane(norm: str, w: Tensor, c: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """The smallest delta (in ``norm``) with <w, delta> = c and lower <= delta <= upper, exactly.

    ``w``, ``lower`` (<= 0) and ``upper`` (>= 0) are (N, D), ``c`` is (N,). When the box cannot
    reach the hyperplane, delta goes as far towards it as the box allows (FAB's rule).

    With v = sign(c) w, every coordinate moves along sign(v_i) up to its room r_i in the box.
    Linf: delta_i = sign(v_i) min(s, r_i); L2 (KKT): delta_i = sign(v_i) min(s |v_i|, r_i). In
    both cases <v, delta> = sum_i a_i min(s, t_i) (Linf: a = |v|, t = r; L2: a = v^2, t = r/|v|)
    is piecewise linear and nondecreasing in s: sorting the knots t gives s exactly (the paper's
    appendix). L1 spends the budget greedily on the coordinates of largest |v_i|.
    """
    n, d = w.shape
    tiny = torch.finfo(w.dtype).tiny
    v = torch.where(c.view(-1, 1) < 0, -w, w)
    need = c.abs().view(-1, 1)  # (N, 1)
    a = v.abs()
    room = torch.where(v > 0, upper, -lower).clamp(min=0) * (a > 0)
    gain = a * room  # <v, delta> when coordinate i is at its bound, for every norm
    if norm == "l1":
        order = a.argsort(dim=1, descending=True)
        g = gain.gather(1, order)
        before = g.cumsum(dim=1) - g
        take = torch.minimum(g, (need - before).clamp(min=0))
        step = take / a.gather(1, order).clamp(min=tiny)
        mag = torch.zeros_like(w).scatter(1, order, step)
        return v.sign() * mag
    if norm == "linf":
        weight, knot = a, room
    else:
        weight, knot = a * a, torch.where(a > 0, room / a.clamp(min=tiny), torch.zeros_like(a))
    knot = knot.clamp(max=torch.finfo(w.dtype).max)
    knot, order = knot.sort(dim=1)
    weight, gain = weight.gather(1, order), gain.gather(1, order)
    settled = gain.cumsum(dim=1)  # sum over the knots <= t_k of a_j t_j
    free = weight.sum(dim=1, keepdim=True) - weight.cumsum(dim=1)  # sum of a_j over knots > t_k
    at_knot = settled + knot * free  # <v, delta> at s = t_k, nondecreasing in k
    k = (at_knot < need).sum(dim=1, keepdim=True)  # first knot that reaches the hyperplane
    reachable = k < d
    k = k.clamp(max=d - 1)
    below = torch.where(k > 0, settled.gather(1, (k - 1).clamp(min=0)), torch.zeros_like(need))
    slope = free.gather(1, k) + weight.gather(1, k)
    s = (need - below) / slope.clamp(min=tiny)
    s = torch.where(reachable, s, knot[:, -1:]).clamp(min=0)  # unreachable: all to the bound
    if norm == "linf":
        mag = torch.minimum(s, room)
    else:
        mag = torch.where(a > 0, torch.minimum(s * a, room), torch.zeros_like(a))
    return v.sign() * mag


@register("fab")
@dataclass(kw_only=True, eq=False)
class FAB(Attack):
    """Steps onto the linearized decision boundary, biased towards the clean point.

    Each step linearizes, at the current point, the boundary between the true class and another
    one (untargeted: the class whose linearized boundary is closest in the threat's norm;
    ``targeted`` FAB-T: a fixed target class; a caller's ``target=``: the target against the
    class that currently beats it), projects the current and the clean point exactly onto that
    hyperplane intersected with the box, and moves to
    ``(1 - alpha) (x + eta delta) + alpha (x_orig + eta delta_orig)`` with
    ``alpha = min(|delta| / (|delta| + |delta_orig|), alpha_max)``. An adversarial point is kept
    if it is the closest so far, and the search backtracks to ``(1 - beta) x_orig + beta x``.

    ``targeted=True`` is AutoAttack's FAB-T: one run towards each of the ``targets`` classes with
    the highest clean logits, each on the samples not yet broken; success is misclassification.
    Restart ``r > 0`` starts uniformly in a ball of radius half the smallest of the best distance
    found and ``eps_init`` (default: the threat's eps; with neither finite: the distance to the
    linearized boundary at the clean point). With a finite eps only a point inside the ball
    counts, and ``early_stop`` drops a sample as soon as it has one; with an infinite eps every
    sample runs every step, target and restart, and the smallest perturbation found is returned.

    Cost per step and sample: untargeted, C - 1 forward+backward passes (the gradient of
    f_j - f_y for each other class j, one class at a time) and one forward pass (is the new
    point adversarial?); FAB-T and a caller's target, one forward+backward and one forward.
    FAB-T adds one forward pass to rank the targets. A caller's ``target=`` overrides
    ``targeted``.
    """

    steps: int = 100
    restarts: int = 1
    targets: int = 9
    targeted: bool = False
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    eps_init: float | None = None
    early_stop: bool = True

    minimum_norm = True

    def _check(self) -> None:
        positive_int(self.steps, name="steps", who="FAB")
        positive_int(self.restarts, name="restarts", who="FAB")
        positive_int(self.targets, name="targets", who="FAB")
        for name in ("alpha_max", "eta", "beta"):
            nonneg_float(getattr(self, name), name=name, who="FAB")
        if self.alpha_max > 1:
            raise InputError(f"FAB: alpha_max must be in [0, 1], got {self.alpha_max!r}")
        if self.beta >= 1:
            raise InputError(f"FAB: beta must be in [0, 1), got {self.beta!r}")
        if self.eta == 0:
            raise InputError("FAB: eta must be > 0 (1.05 in the paper)")
        if self.eps_init is not None:
            nonneg_float(self.eps_init, name="eps_init", who="FAB")
            if self.eps_init == 0:
                raise InputError("FAB: eps_init must be > 0 (or None)")
        for name in ("targeted", "early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"FAB: {name} must be True or False, got {getattr(self, name)!r}")

    def _run(self, p: Problem) -> RunOutput:
        n, x = len(p), p.x
        eps = p.threat.eps_tensor(x)
        scale = eps if self.eps_init is None else torch.full_like(eps, float(self.eps_init))
        # the closest adversarial point; with a finite eps a sample is done once inside it
        best = Best.closest(x, eps)
        # the linearized distance to the boundary at x_orig: a fallback restart scale
        lin_d = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        plans: list[Tensor | None]
        if p.targeted:
            plans = [p.target]
        elif self.targeted:
            clean = p.model.logits(x)
            order = clean.scatter(1, p.y.view(-1, 1), -math.inf).argsort(dim=1, descending=True)
            plans = [order[:, k] for k in range(min(self.targets, p.num_classes - 1))]
        else:
            plans = [None]

        def run(rows: Tensor, i: int) -> None:
            """Run i: target k, restart r, on the samples ``rows``."""
            k, r = divmod(i, self.restarts)
            target = plans[k]
            q = p.select(rows)
            start = None
            if r > 0:
                # the paper's restart ball: half the best distance so far, at most half eps
                radius = torch.minimum(best.score[rows], scale[rows])
                radius = torch.where(torch.isfinite(radius), radius, lin_d[rows])
                radius = torch.where(torch.isfinite(radius), radius / 2, torch.zeros_like(radius))
                start = q.threat.with_eps(radius).random_init(q.x, q.rng, k, r)
            target = None if target is None else target[rows]
            self._single(best, lin_d, q, rows, target, start, k, r)

        def side_by_side(q: Problem, rows: Tensor, wide: Problem, group: Sequence[int]) -> Best:
            """FAB-T's targets ``group`` in one batch (first runs: no restart ball)."""
            out = Best.closest(wide.x, wide.threat.eps_tensor(wide.x))
            target = torch.cat([plans[i][rows] for i in group])  # type: ignore[index]
            lin_wide = torch.full((len(wide),), math.inf, device=x.device, dtype=x.dtype)
            everything = torch.arange(len(wide), device=x.device)
            self._single(out, lin_wide, wide, everything, target, None, group[0], 0)
            return out

        # targets in turn, restarts within each; without early_stop every run sees every sample.
        # On a GPU FAB-T's targets go side by side: a run whose restart ball comes from the runs
        # before it (restarts > 1) cannot, so they stay one at a time.
        total = len(plans) * self.restarts
        at_once = runs_at_once(p, total) if self.restarts == 1 and plans[0] is not None else 1
        cascade(best, p, total, run, side_by_side, at_once=at_once, everyone=not self.early_stop)
        return best.output()

    def _gap(
        self, q: Problem, xa: Tensor, target: Tensor | None, frozen: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The linear function (value (m,), gradient (m, D)) whose zero set is the boundary to
        step onto, and the logits at ``xa``; the ``frozen`` rows' passes are not charged."""
        if q.target is not None:  # the caller's target against whichever class beats it now
            value, grad, logits = q.model.value_and_grad(xa, _target_gap, q.target, frozen=frozen)
            return value, flat(grad), logits
        if target is not None:  # FAB-T: the boundary between the target and the true class
            value, grad, logits = q.model.value_and_grad(xa, _pair_gap, target, q.y, frozen=frozen)
            return value, flat(grad), logits
        # untargeted: the gradient of f_j - f_y for every j != y, one class at a time (C - 1
        # passes), keeping per sample the j whose linearized boundary is closest: memory stays
        # O(m D) whatever the number of classes
        c = q.num_classes
        # the classes other than y in increasing order, (m, C-1): j, or j + 1 from y on (no
        # boolean-mask indexing, which waits on the device)
        ranks = torch.arange(c - 1, device=xa.device).view(1, -1)
        others = ranks + (ranks >= q.y.view(-1, 1))
        best_value, grad, logits = q.model.value_and_grad(
            xa, _pair_gap, others[:, 0], q.y, frozen=frozen
        )
        best_grad = flat(grad)  # (m, ...) -> (m, D)
        # the distance to the linearized boundary
        best_dist = best_value.abs() / q.threat.dual_norm(best_grad).clamp(min=1e-12)
        for j in range(1, c - 1):
            value, grad, _ = q.model.value_and_grad(xa, _pair_gap, others[:, j], q.y, frozen=frozen)
            grad = flat(grad)  # (m, ...) -> (m, D)
            dist = value.abs() / q.threat.dual_norm(grad).clamp(min=1e-12)
            closer = dist < best_dist
            best_dist = torch.where(closer, dist, best_dist)
            best_value = torch.where(closer, value, best_value)
            best_grad = torch.where(closer.view(-1, 1), grad, best_grad)
        return best_value, best_grad, logits

    def _single(
        self,
        best: Best,
        lin_d: Tensor,
        q: Problem,
        rows: Tensor,
        target: Tensor | None,
        start: Tensor | None,
        k: int,
        r: int,
    ) -> None:
        """One run of FAB (one target, one restart) on the samples ``rows`` (= ``q``)."""
        lo, hi = q.threat.bounds
        norm = q.threat.norm
        # with early_stop, samples done (a point inside the eps ball) leave the batch at the
        # next compaction and ride along frozen until then (``lanes.done``): their points are
        # never offered, their passes not charged
        lanes = Lanes(q, every=None if self.early_stop else 1)
        q = lanes.start(q)
        xa = q.x.clone() if start is None else start
        desc = f"{q.name} target {k + 1} restart {r + 1}" if (k or self.restarts > 1) else None
        for t in q.progress(self.steps, desc):
            frozen = lanes.done
            f, w, logits = self._gap(q, xa, target, frozen)
            # the current point, checked for free
            adv = masked(q.is_adversarial(logits), frozen)
            best.offer(rows, xa, q.threat.distance(xa, q.x), adv)
            x0f, xf = flat(q.x), flat(xa)  # (m, ...) -> (m, D)
            # project the current and the clean point onto the hyperplane f + <w, z - xa> = 0
            d1 = project_hyperplane(norm, w, -f, lo - xf, hi - xf)
            d2 = project_hyperplane(norm, w, -f - (w * (x0f - xf)).sum(dim=1), lo - x0f, hi - x0f)
            n1, n2 = _norm(q, d1), _norm(q, d2)
            if t == 0 and start is None:  # the linearized distance at x_orig
                lin_d[rows] = torch.minimum(lin_d[rows], n2)
            alpha = (n1 / (n1 + n2).clamp(min=1e-12)).clamp(max=self.alpha_max).view(-1, 1)
            step = (1 - alpha) * (xf + self.eta * d1) + alpha * (x0f + self.eta * d2)
            xa = step.view_as(q.x).clamp(lo, hi)
            adv = masked(q.is_adversarial(q.model.logits(xa, frozen=frozen)), frozen)
            best.offer(rows, xa, q.threat.distance(xa, q.x), adv)
            # from an adversarial point, backtrack towards x_orig: the next step starts closer
            b = per_sample(torch.where(adv, self.beta, 1.0).to(xa.dtype), xa)
            xa = b * xa + (1 - b) * q.x
            if self.early_stop:
                lanes.done = best.done(rows)  # sticky: the best distance only shrinks
                if lanes.due(t):
                    go = lanes.compact()
                    if go is not None:
                        rows, xa, q = rows[go], xa[go], q.select(go)
                        target = None if target is None else target[go]
                        if go.numel() == 0:
                            break
        q.model.settle()


def _norm(q: Problem, d: Tensor) -> Tensor:
    """Per-sample size of a flat perturbation (m, D) in the threat's norm."""
    return q.threat.distance(d, torch.zeros_like(d))
