"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016): steps onto the nearest linearized boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._tensor import flat
from .._validate import check_float, check_int, positive_int
from ..threat import L2, ThreatModel
from ._base import Attack, Problem, RunOutput
from ._best import Best
from ._losses import other_max
from ._minnorm import live_rows, need_two_classes
from ._registry import register


def _pair_gap(logits: Tensor, cls: Tensor, ref: Tensor) -> Tensor:
    """f_cls - f_ref per row: < 0 while the row is still on ref's side."""
    return (logits.gather(1, cls.view(-1, 1)) - logits.gather(1, ref.view(-1, 1))).view(-1)


def _free(w: Tensor, xa: Tensor, lo: float, hi: float) -> Tensor:
    """w with the coordinates the box blocks set to 0: those at a bound that a step along w
    would push further out. On images with saturated pixels (most of MNIST is 0) a step along
    the full gradient is largely clipped away and falls short of the boundary it aimed at, which
    is what made DeepFool take 10 steps instead of 2-3 there. xa: (m, D) or (m, 1, D)."""
    blocked = ((xa <= lo) & (w < 0)) | ((xa >= hi) & (w > 0))
    return w.masked_fill(blocked, 0)


def _target_gap(logits: Tensor, target: Tensor) -> Tensor:
    """f_target - max of the other logits: < 0 until the row is classified as the target."""
    return logits.gather(1, target.view(-1, 1)).view(-1) - other_max(logits, target)


@register("deepfool")
@dataclass(kw_only=True, eq=False)
class DeepFool(Attack):
    """Linearize the classifier at the current point and step onto the nearest boundary.

    Untargeted: per step, the gradients of ``f_k - f_y`` for the ``candidates - 1`` classes k
    with the highest clean logits (all of them when ``candidates`` >= the number of classes); the
    class whose linearized boundary is nearest in the threat's norm (``|f_k - f_y| /
    ||grad||_dual``) sets the step, the smallest one that reaches that boundary (L2:
    ``|f| / ||w||_2^2 w``; Linf: ``|f| / ||w||_1 sign(w)``). Targeted: the boundary between the
    target and the class that currently beats it. The steps add up to ``r``; the point is
    ``x + (1 + overshoot) r``, clipped to the bounds, and a sample stops at its first adversarial
    point. ``trace["iterations"]`` holds the steps each sample took (-1: none broke it).

    Unlike the paper, the box is part of the linearization: the gradient coordinates that would
    push a pixel already at a bound further out are set to 0 before the nearest boundary is
    chosen and the step is taken, and ``r`` is kept inside the box. On MNIST, where most pixels
    are 0, a step along the full gradient is mostly clipped away and falls short of the
    boundary it aimed at: the median sample then needs 9-12 steps (on an undefended MLP and
    LeNet) where the box-aware step needs 1-2.

    A finite eps counts a success only inside it (the point found is then projected onto the
    ball and checked again). Cost per step and sample: ``candidates - 1`` forward and backward
    passes untargeted (one targeted); one forward pass to rank the candidates when they are
    fewer than the classes; one forward pass to check the last point.
    """

    threat: ThreatModel = field(default_factory=lambda: L2(math.inf), kw_only=False)
    steps: int = 50
    overshoot: float = 0.02
    candidates: int = 10

    norms = ("l2", "linf")
    minimum_norm = True

    def _check(self) -> None:
        positive_int(self.steps, name="steps", who="DeepFool")
        check_float(self.overshoot, name="overshoot", who="DeepFool")
        check_int(
            self.candidates,
            name="candidates",
            who="DeepFool",
            low=2,
            hint="the true class and at least one other",
        )

    def _run(self, p: Problem) -> RunOutput:
        need_two_classes(p, "DeepFool")
        lo, hi = p.threat.bounds
        best = Best.closest(p.x, p.threat.eps_tensor(p.x))
        iterations = torch.full((len(p),), -1, dtype=torch.long, device=p.x.device)
        rows = live_rows(p)
        q = p.select(rows)
        others = None if p.targeted else self._others(q)  # (m, K-1) candidate classes
        xa = q.x.clone()
        r_sum = torch.zeros_like(flat(q.x))  # (m, D) the sum of the steps, kept inside the box
        for k in q.progress(self.steps):
            if rows.numel() == 0:
                break
            f, w, logits = self._nearest(q, xa, others)
            adv = q.is_adversarial(logits)
            best.offer(rows, xa, q.threat.distance(xa, q.x), adv)
            iterations[rows] = torch.where(adv, k, iterations[rows])
            # a sample stops at its first adversarial point
            go = (~adv).nonzero().view(-1)
            if go.numel() < rows.numel():
                rows, q, xa, f, w, r_sum = rows[go], q.select(go), xa[go], f[go], w[go], r_sum[go]
                others = None if others is None else others[go]
                if rows.numel() == 0:
                    break
            # the smallest step onto the linearized boundary (1e-4: land just past it), along the
            # gradient with the coordinates the box blocks taken out (_free): it reaches the
            # boundary where the plain step would be clipped short
            gain = (f.abs() + 1e-4).view(-1, 1)  # (m, 1)
            if q.threat.norm == "l2":
                r_sum = r_sum + gain / w.pow(2).sum(dim=1, keepdim=True).clamp(min=1e-12) * w
            else:
                r_sum = r_sum + gain / w.abs().sum(dim=1, keepdim=True).clamp(min=1e-12) * w.sign()
            x0 = flat(q.x)
            r_sum = (x0 + r_sum).clamp(lo, hi) - x0  # a step past the box would not move x
            xa = (q.x + ((1 + self.overshoot) * r_sum).view_as(q.x)).clamp(lo, hi)
        if rows.numel():  # the last step's point
            adv = q.is_adversarial(q.model.logits(xa))
            best.offer(rows, xa, q.threat.distance(xa, q.x), adv)
            iterations[rows] = torch.where(adv, self.steps, iterations[rows])
        return best.output({"iterations": iterations})

    def _others(self, q: Problem) -> Tensor:
        """(m, K-1): the classes other than y to linearize, by decreasing clean logit."""
        m, c = len(q), q.num_classes
        k = min(self.candidates, c)
        if k == c:  # every other class: no ranking pass needed
            classes = torch.arange(c, device=q.x.device).expand(m, c)
            return classes[classes != q.y.view(-1, 1)].view(m, c - 1)  # (m*(C-1),) -> (m, C-1)
        clean = q.model.logits(q.x).scatter(1, q.y.view(-1, 1), -math.inf)
        return clean.topk(k - 1, dim=1).indices

    def _nearest(
        self, q: Problem, xa: Tensor, others: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The linear function to step onto: value f (m,) < 0, gradient w (m, D) without the
        coordinates the box blocks, and the logits at ``xa``."""
        lo, hi = q.threat.bounds
        if others is None:  # targeted: the target against whichever class beats it now
            assert q.target is not None
            f, w, logits = q.model.value_and_grad(xa, _target_gap, q.target)
            return f, _free(flat(w), flat(xa), lo, hi), logits
        m, j = others.shape
        # one pass per (sample, candidate): rows are the samples repeated j times
        rows = torch.arange(m, device=xa.device).repeat_interleave(j)  # (m*j,)
        f, w, logits = q.model.value_and_grad(
            xa[rows], _pair_gap, others.reshape(-1), q.y[rows], rows=rows
        )
        f, w = f.view(m, j), flat(w).view(m, j, -1)  # (m*j,) -> (m, j); (m*j, ...) -> (m, j, D)
        # the nearest boundary the box lets the point reach, not the nearest one through a wall
        w = _free(w, flat(xa).unsqueeze(1), lo, hi)
        dual = w.abs().sum(dim=2) if q.threat.norm == "linf" else w.norm(dim=2)  # (m, j)
        nearest = (f.abs() / dual.clamp(min=1e-12)).argmin(dim=1)  # (m,)
        pick = torch.arange(m, device=xa.device)
        return f[pick, nearest], w[pick, nearest], logits.view(m, j, -1)[:, 0]
