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

    Resolution: Adam's first step moves each coordinate by about ``lr`` in tanh space whatever
    the gradient's size, so perturbations much smaller than that are overestimated; lower
    ``lr`` when the distances you expect are tiny.
    """

    threat: ThreatModel = field(default_factory=lambda: L2(math.inf), kw_only=False)
    steps: int = 1000
    lr: float = 0.01
    kappa: float = 0.0
    search_steps: int = 9
    initial_c: float = 1e-3
    early_abort: bool = True

    norms = ("l2",)
    minimum_norm = True

    def _check(self) -> None:
        positive_int(self.steps, name="steps", who="CW")
        positive_int(self.search_steps, name="search_steps", who="CW")
        nonneg_float(self.lr, name="lr", who="CW")
        nonneg_float(self.kappa, name="kappa", who="CW")
        nonneg_float(self.initial_c, name="initial_c", who="CW")
        if self.lr == 0 or self.initial_c == 0:
            raise InputError("CW: lr and initial_c must be > 0")

    def _run(self, p: Problem):
        lo, hi = p.threat.bounds
        half = (hi - lo) / 2
        n, x = len(p), p.x
        # tanh change of variables: x = lo + half * (tanh(w) + 1) covers the box exactly
        w0 = torch.atanh(((x - lo) / half - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        c = torch.full((n,), float(self.initial_c), device=x.device, dtype=x.dtype)
        c_lo = torch.zeros_like(c)
        c_hi = torch.full_like(c, math.inf)
        best = x.clone()
        best_d = torch.full_like(c, math.inf)
        abort_every = max(1, math.ceil(self.steps / 10))
        b1, b2, tiny = 0.9, 0.999, 1e-8

        def objective(logits, labels, c_rows):
            return _cw_objective(logits, labels, c_rows, targeted=p.targeted, kappa=self.kappa)

        for s in range(self.search_steps):
            w = w0.clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            hit = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = torch.full_like(c, math.inf)
            rows = torch.arange(n, device=x.device)
            q = p
            for t in p.progress(self.steps, f"{p.name} search {s + 1}/{self.search_steps}"):
                th = torch.tanh(w[rows])
                xa = lo + half * (th + 1)
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
                k = t + 1
                m[rows] = b1 * m[rows] + (1 - b1) * g
                v[rows] = b2 * v[rows] + (1 - b2) * g * g
                m_hat = m[rows] / (1 - b1**k)
                v_hat = v[rows] / (1 - b2**k)
                w[rows] = w[rows] - self.lr * m_hat / (v_hat.sqrt() + tiny)
                if self.early_abort and k % abort_every == 0:
                    total = dist2 + f
                    stalled = total > 0.9999 * prev[rows]
                    prev[rows] = total
                    if bool(stalled.any()):
                        go = (~stalled).nonzero().view(-1)
                        rows, q = rows[go], q.select(go)
                        if rows.numel() == 0:
                            break
            # binary search on c, per sample
            c_hi = torch.where(hit, torch.minimum(c_hi, c), c_hi)
            c_lo = torch.where(hit, c_lo, torch.maximum(c_lo, c))
            c = torch.where(torch.isinf(c_hi), c * 10, (c_lo + c_hi) / 2)
        return RunOutput(best, torch.isfinite(best_d) & (best_d <= p.threat.eps_tensor(x)))
