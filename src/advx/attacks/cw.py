"""Carlini & Wagner's L2 attack (2017): a minimum-norm attack with a per-sample search over c."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._tensor import flat
from .._validate import nonneg_float, positive_int
from ..errors import InputError
from ..threat import L2, ThreatModel
from ._base import Attack, Problem, RunOutput
from ._losses import margin
from ._optim import adam_step, search_c
from ._registry import register


def _cw_objective(
    logits: Tensor, labels: Tensor, c: Tensor, *, targeted: bool, kappa: float
) -> Tensor:
    """c * max(-margin, -kappa): zero once the sample is adversarial with confidence kappa."""
    return c * torch.clamp(-margin(logits, labels, targeted), min=-kappa)


@register("cw")
@dataclass(kw_only=True, eq=False)
class CW(Attack):
    """Minimize ||delta||_2^2 + c * f(x + delta) with Adam in tanh space; binary search on c.

    Per sample: the search over c (x10 until a success, then bisection), early abort of a search
    step when its loss stalls, and the smallest successful perturbation found is kept. With
    ``threat.eps = inf`` it is a minimum-norm attack; with a finite eps only a success inside the
    ball counts.

    Strong at any budget, without extra passes:

    * ``initial_c=None`` (the default) sets each sample's first c from the gradient of its first
      step, at x itself: ``2 (f(x) + kappa) / ||grad f(x)||^2``, the c above which the
      minimum of the linearized objective is adversarial. The search then grows c where that
      was too little and bisects where it was enough, instead of spending steps growing c from
      a fixed start (five search steps from 1e-3 never got past c = 10). A number starts every
      sample there.
    * each search step goes on from the point and the Adam state the last one left, so a
      schedule of s x k steps moves as far as one run of s * k steps (in tanh space Adam moves a
      coordinate by about ``lr`` per step: pixels at a bound need hundreds of steps to move
      at all). ``restart=True`` starts every search step again from x, as in the paper.

    Resolution: Adam's first step moves each coordinate by about ``lr`` in tanh space whatever
    the gradient's size, so perturbations much smaller than that are overestimated; lower
    ``lr`` when the distances you expect are tiny.
    """

    threat: ThreatModel = field(default_factory=lambda: L2(math.inf), kw_only=False)
    steps: int = 1000
    lr: float = 0.01
    kappa: float = 0.0
    search_steps: int = 9
    initial_c: float | None = None
    early_abort: bool = True
    restart: bool = False

    norms = ("l2",)
    minimum_norm = True

    def _check(self) -> None:
        positive_int(self.steps, name="steps", who="CW")
        positive_int(self.search_steps, name="search_steps", who="CW")
        nonneg_float(self.lr, name="lr", who="CW")
        nonneg_float(self.kappa, name="kappa", who="CW")
        if self.initial_c is not None:
            nonneg_float(self.initial_c, name="initial_c", who="CW")
        if not isinstance(self.restart, bool):
            raise InputError(f"CW: restart must be a bool, got {self.restart!r}")
        if self.lr == 0 or self.initial_c == 0:
            raise InputError("CW: lr and initial_c must be > 0")

    def _run(self, p: Problem):
        lo, hi = p.threat.bounds
        half = (hi - lo) / 2
        n, x = len(p), p.x
        # tanh change of variables: x = lo + half * (tanh(w) + 1) covers the box exactly
        w0 = torch.atanh(((x - lo) / half - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        probe = self.initial_c is None
        c = torch.full((n,), float(self.initial_c or 1.0), device=x.device, dtype=x.dtype)
        c_lo = torch.zeros_like(c)
        c_hi = torch.full_like(c, math.inf)
        best = x.clone()
        best_d = torch.full_like(c, math.inf)
        abort_every = max(1, math.ceil(self.steps / 10))

        def objective(logits, labels, c_rows):
            return _cw_objective(logits, labels, c_rows, targeted=p.targeted, kappa=self.kappa)

        # Adam's state: the iterate w, the moments and the step count (per sample, for the bias
        # correction), carried from one search step to the next unless ``restart``
        w = w0.clone()
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        adam_t = torch.zeros(n, dtype=x.dtype, device=x.device)
        shape = (-1, *[1] * (x.dim() - 1))
        for s in range(self.search_steps):
            if self.restart and s:
                w, m, v, adam_t = w0.clone(), torch.zeros_like(w), torch.zeros_like(w), adam_t * 0
            hit = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = torch.full_like(c, math.inf)
            rows = torch.arange(n, device=x.device)
            q = p
            for t in p.progress(self.steps, f"{p.name} search {s + 1}/{self.search_steps}"):
                th = torch.tanh(w[rows])
                xa = lo + half * (th + 1)
                if probe and s == 0 and t == 0:
                    # the first step's gradient, at x itself, sets each sample's c: the
                    # linearized c above which the minimum of ||delta||^2 + c f is adversarial
                    f, grad_f, logits = q.model.value_and_grad(
                        xa, objective, q.labels, torch.ones_like(c)
                    )
                    gap = (f + self.kappa).clamp(min=0)
                    c0 = 2 * gap / flat(grad_f).pow(2).sum(dim=1)
                    # no gradient (a flat spot): nothing to estimate from; start at 1
                    c = torch.where(torch.isfinite(c0) & (c0 > 0), c0, torch.ones_like(c0))
                    f, grad_f = f * c, grad_f * c.view(shape)
                else:
                    f, grad_f, logits = q.model.value_and_grad(xa, objective, q.labels, c[rows])
                diff = xa - q.x
                dist2 = flat(diff).pow(2).sum(dim=1)
                adv = q.is_adversarial(logits)
                if self.kappa > 0:
                    adv &= margin(logits, q.labels, p.targeted) >= self.kappa
                better = adv & (dist2.sqrt() < best_d[rows])
                best[rows[better]] = xa[better]
                best_d[rows[better]] = dist2[better].sqrt()
                hit[rows[adv]] = True
                # Adam on w; the gradient of ||delta||^2 + c f goes through
                # dx/dw = half (1 - tanh^2)
                g = (2 * diff + grad_f) * (half * (1 - th * th))
                k = (adam_t[rows] + 1).view(shape)
                adam_t[rows] += 1
                m[rows], v[rows], step = adam_step(m[rows], v[rows], g, k, self.lr)
                w[rows] = w[rows] - step
                if self.early_abort and (t + 1) % abort_every == 0:
                    total = dist2 + f
                    stalled = total > 0.9999 * prev[rows]
                    prev[rows] = total
                    if bool(stalled.any()):
                        go = (~stalled).nonzero().view(-1)
                        rows, q = rows[go], q.select(go)
                        if rows.numel() == 0:
                            break
            c, c_lo, c_hi = search_c(c, c_lo, c_hi, hit)
        return RunOutput(best, torch.isfinite(best_d) & (best_d <= p.threat.eps_tensor(x)))
