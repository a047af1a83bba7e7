"""FMN: fast minimum-norm attacks (Pintor et al., NeurIPS 2021), Linf, L2 and L1."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .._tensor import flat, per_sample
from .._validate import check_float, positive_float, positive_int
from ._base import Attack, Problem, RunOutput
from ._best import Best
from ._losses import margin
from ._minnorm import cosine, farthest, live_rows, need_two_classes
from ._registry import register


@register("fmn")
@dataclass(kw_only=True, eq=False)
class FMN(Attack):
    """Normalized gradient steps on the logit margin, projected onto a ball whose radius adapts.

    Each step moves by ``alpha`` along the L2-normalized gradient of the margin (the best other
    logit minus the true one; targeted: the target's logit minus the best other one), then
    projects onto the ball of radius ``epsilon`` in the threat's norm (L2: onto its sphere, as
    DDN does and as adv-lib's FMN does in effect), intersected with the box. The radius follows
    the paper's rule: after an adversarial point it shrinks to ``min((1 - gamma) epsilon, best
    distance)``; before any success it is set to the current norm plus the linearized distance
    to the boundary, ``|margin| / ||grad||_dual``, here times ``1 + gamma`` (without that
    overshoot the search can approach the boundary from inside forever, as it does on a ReLU
    MLP in L2); after a failed step that follows a success it grows by ``1 + gamma``. ``alpha``
    and ``gamma`` are cosine-annealed from ``alpha_init``/``gamma_init`` to ``alpha_final``
    (default ``alpha_init / 100``)/``gamma_final``. The closest adversarial point seen is kept
    per sample.

    With ``threat.eps = inf`` every sample runs every step; with a finite eps the radius never
    exceeds it and a sample stops at its first success inside it. Cost per step and sample: one
    forward and one backward pass, plus one forward pass to check the last point.
    """

    steps: int = 100
    alpha_init: float = 1.0
    alpha_final: float | None = None
    gamma_init: float = 0.05
    gamma_final: float = 0.001

    minimum_norm = True

    def _check(self) -> None:
        positive_int(self.steps, name="steps", who="FMN")
        positive_float(self.alpha_init, name="alpha_init", who="FMN")
        if self.alpha_final is not None:
            positive_float(self.alpha_final, name="alpha_final", who="FMN")
        for name in ("gamma_init", "gamma_final"):
            check_float(getattr(self, name), name=name, who="FMN", high=1, high_open=True)

    def _run(self, p: Problem) -> RunOutput:
        need_two_classes(p, "FMN")
        lo, hi = p.threat.bounds
        eps = p.threat.eps_tensor(p.x)
        best = Best.closest(p.x, eps)
        # the radius never grows past the budget nor past the farthest corner of the box
        cap = torch.minimum(farthest(p.threat, p.x), eps)
        stop_early = bool(torch.isfinite(eps).any())
        loss_fn = partial(margin, targeted=p.targeted)
        alpha_final = self.alpha_final if self.alpha_final is not None else self.alpha_init / 100
        rows = live_rows(p)
        q = p.select(rows)
        xa = q.x.clone()
        radius = torch.zeros_like(cap[rows])
        tiny = torch.finfo(xa.dtype).tiny
        for k in q.progress(self.steps):
            if rows.numel() == 0:
                break
            loss, grad, logits = q.model.value_and_grad(xa, loss_fn, q.labels)
            adv = q.is_adversarial(logits)
            norm = q.threat.distance(xa, q.x)
            best.offer(rows, xa, norm, adv)
            if stop_early:  # a success inside the budget ends the sample's search
                go = (~best.done(rows)).nonzero().view(-1)
                if go.numel() < rows.numel():
                    rows, q, xa, grad, adv, radius, loss, norm = (
                        rows[go], q.select(go), xa[go], grad[go], adv[go], radius[go],
                        loss[go], norm[go],
                    )  # fmt: skip
                    if rows.numel() == 0:
                        break
            gamma = cosine(k, self.steps, self.gamma_init, self.gamma_final)
            found = best.found.index_select(0, rows)
            # the first-order distance to the boundary: where the radius goes before a success
            reach = norm + loss.abs() / q.threat.dual_norm(grad).clamp(min=1e-12)
            radius = torch.where(
                adv,
                torch.minimum(radius * (1 - gamma), best.score.index_select(0, rows)),
                # before a success: just past the linearized boundary
                torch.where(found, radius * (1 + gamma), reach * (1 + gamma)),
            ).minimum(cap[rows])
            # a step of length alpha along the L2-normalized gradient, onto the ball and the box
            gnorm = flat(grad).norm(dim=1)
            unit = grad * per_sample(torch.where(gnorm > 0, 1 / gnorm.clamp(min=tiny), 0.0), grad)
            step = xa + cosine(k, self.steps, self.alpha_init, alpha_final) * unit
            if q.threat.norm == "l2":
                # onto the sphere, not into the ball (as DDN does): on a model whose gradients
                # are flat near x (TRADES), steps inside the ball stall far from any boundary
                delta = flat(step - q.x)
                dnorm = delta.norm(dim=1)
                scale = torch.where(dnorm > 0, radius / dnorm.clamp(min=tiny), 0.0)
                xa = (q.x + (delta * scale.view(-1, 1)).view_as(q.x)).clamp(lo, hi)
            else:
                xa = q.threat.with_eps(radius).project(step, q.x).clamp(lo, hi)
        if rows.numel():  # the last step's point
            adv = q.is_adversarial(q.model.logits(xa))
            best.offer(rows, xa, q.threat.distance(xa, q.x), adv)
        return best.output()
