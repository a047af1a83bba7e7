"""The best point per sample, kept once for every attack that keeps one.

Two rules cover the attacks:

- :meth:`Best.highest` (fixed budget: PGD, APGD, Square, SimBA, a cascade): the first
  adversarial point, else the one with the highest loss (larger is better for the attacker);
  once a sample has an adversarial point it is kept.
- :meth:`Best.closest` (minimum-norm: FAB, HopSkipJump, Boundary): the adversarial point at the
  smallest distance; a closer one always replaces it. With a finite eps a sample is ``done``
  once its point is inside the ball.

An attack offers its candidates once per step: ``best.offer(rows, x, score, adv)``, with
``rows`` the candidates' positions in the problem. ``offer`` never reads a value back to the
host (``torch.where`` and ``index_copy_`` with the given rows, no boolean-mask indexing), so it
can sit inside an inner loop that runs without host syncs. :meth:`Best.rounds` runs restarts,
repetitions or the stages of a cascade, each on the samples not done yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._result import RunOutput

__all__ = ["Best"]


@dataclass(eq=False)
class Best:
    """Per sample (N rows): the kept point ``x``, its ``score`` (loss, or distance when
    ``minimize``) and ``found`` (the point is adversarial). ``eps`` (N,): the budget a
    minimum-norm search counts a success inside (None: any distance)."""

    x: Tensor
    score: Tensor
    found: Tensor
    minimize: bool = False
    eps: Tensor | None = None

    @classmethod
    def highest(cls, x0: Tensor) -> Best:
        """First adversarial point, else highest loss; starts at ``x0`` (copied) with loss -inf."""
        n = x0.shape[0]
        return cls(
            x0.clone(),
            torch.full((n,), -math.inf, device=x0.device, dtype=x0.dtype),
            torch.zeros(n, dtype=torch.bool, device=x0.device),
        )

    @classmethod
    def closest(cls, x0: Tensor, eps: Tensor | None = None) -> Best:
        """Closest adversarial point; starts at ``x0`` (copied) with distance inf."""
        n = x0.shape[0]
        return cls(
            x0.clone(),
            torch.full((n,), math.inf, device=x0.device, dtype=x0.dtype),
            torch.zeros(n, dtype=torch.bool, device=x0.device),
            minimize=True,
            eps=eps,
        )

    def __len__(self) -> int:
        return self.x.shape[0]

    def offer(
        self,
        rows: Tensor | None,
        x: Tensor,
        score: Tensor | None = None,
        adv: Tensor | None = None,
    ) -> Tensor:
        """Offer one candidate per entry of ``rows`` (distinct positions, (R,); None: every
        sample in order): points ``x`` (R, ...), their ``score`` (R,) and ``adv`` (R,) bool.

        ``highest``: ``score`` is the loss; None takes adversarial points only. ``closest``:
        ``score`` is the distance (required); ``adv`` None means every point is adversarial.
        Returns bool (R,): which candidates were kept. No host sync.
        """
        if adv is None:
            adv = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        old_score = self.score if rows is None else self.score.index_select(0, rows)
        old_found = self.found if rows is None else self.found.index_select(0, rows)
        if self.minimize:
            if score is None:
                raise ValueError("Best.offer: a closest-point search needs the distances")
            take = adv & (score < old_score)
        elif score is None:
            take = ~old_found & adv
        else:
            take = ~old_found & (adv | (score > old_score))
        old_x = self.x if rows is None else self.x.index_select(0, rows)
        mask = take.view(-1, *([1] * (x.dim() - 1)))  # (R,) -> (R, 1, ..., 1)
        new_x = torch.where(mask, x.to(self.x.dtype), old_x)
        new_found = old_found | (take & adv)
        if score is None:
            new_score = old_score
        else:
            new_score = torch.where(take, score.to(self.score.dtype), old_score)
        if rows is None:
            self.x.copy_(new_x)
            self.score.copy_(new_score)
            self.found.copy_(new_found)
        else:
            self.x.index_copy_(0, rows, new_x)
            self.score.index_copy_(0, rows, new_score)
            self.found.index_copy_(0, rows, new_found)
        return take

    def update(self, x: Tensor, score: Tensor, adv: Tensor) -> None:
        """``offer(None, x, score, adv)`` for a ``highest`` tracker that holds only the rows an
        inner loop is running (it is flushed into the caller's tracker with :meth:`offer` when
        rows leave): the same rule with fewer kernels, rebinding ``x``, ``score`` and ``found``
        instead of writing into them. Offering a run's candidates one by one, or the tracker
        that kept the best of them once, leaves a ``highest`` tracker in the same state: both
        keep the first adversarial point, else the first with the highest loss."""
        take = ~self.found & (adv | (score > self.score))
        self.x = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x, self.x)
        self.score = torch.where(take, score, self.score)
        self.found = self.found | adv

    def select(self, idx: Tensor) -> Best:
        """The rows ``idx`` (a tracker of len(idx) rows)."""
        return Best(
            self.x[idx],
            self.score[idx],
            self.found[idx],
            self.minimize,
            None if self.eps is None else self.eps[idx],
        )

    def done(self, rows: Tensor | None = None) -> Tensor:
        """bool (N,) or (R,): samples that need no more work. ``highest``: an adversarial
        point; ``closest``: a point inside a finite eps (never with eps inf or None)."""
        if not self.minimize:
            return self.found if rows is None else self.found.index_select(0, rows)
        score = self.score if rows is None else self.score.index_select(0, rows)
        if self.eps is None:
            return torch.zeros_like(score, dtype=torch.bool)
        eps = self.eps if rows is None else self.eps.index_select(0, rows)
        return torch.isfinite(eps) & (score <= eps)

    @property
    def success(self) -> Tensor:
        """bool (N,): the kept point is adversarial (and, for ``closest`` with an eps, inside
        the ball)."""
        if self.minimize and self.eps is not None:
            return self.found & (self.score <= self.eps)
        return self.found.clone()

    def output(self, trace: dict | None = None) -> RunOutput:
        """The kept points as ``_run``'s result (the loss too, for ``highest``)."""
        return RunOutput(
            self.x,
            self.success,
            loss=None if self.minimize else self.score,
            trace=trace or {},
        )

    def rounds(
        self,
        times: int,
        run: Callable[[Tensor, int], object],
        *,
        skip: Tensor | None = None,
        everyone: bool = False,
    ) -> None:
        """``run(rows, r)`` for r = 0 .. times - 1, each time on the samples not ``done`` (nor
        in ``skip``, a bool (N,) the rounds may update), or on all of them with ``everyone``;
        stops early when none is left. ``run`` offers its points to this tracker.

        Restarts, repetitions (:meth:`Attack.repeat`) and the stages of a cascade are rounds.
        Choosing the rows reads one count back to the host per round, between rounds only.
        """
        n = len(self)
        for r in range(times):
            if everyone:
                rows = torch.arange(n, device=self.x.device)
            else:
                left = ~self.done() if skip is None else ~(self.done() | skip)
                rows = left.nonzero().view(-1)
            if rows.numel() == 0:
                break
            run(rows, r)
