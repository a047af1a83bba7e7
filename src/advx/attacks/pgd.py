"""PGD: projected gradient descent (Madry et al., 2018), with per-sample restarts and early stop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .._validate import nonneg_float, one_of, positive_int
from ._base import Attack, Problem, RunOutput, step_size_default
from ._best import Best
from ._lanes import Lanes
from ._losses import LOSSES, get_loss
from ._registry import register


@register("pgd")
@dataclass(kw_only=True, eq=False)
class PGD(Attack):
    """Projected steepest ascent on the loss from a random start, best point kept per sample.

    ``early_stop`` drops a sample from further passes as soon as it is adversarial; a restart
    only runs on the samples no earlier restart broke. Without ``step_size``, each sample's step
    is 2.5 * eps / steps.
    """

    steps: int = 40
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    early_stop: bool = True

    def _check(self) -> None:
        positive_int(self.steps, name="steps", who="PGD")
        positive_int(self.restarts, name="restarts", who="PGD")
        one_of(self.loss, tuple(LOSSES), name="loss", who="PGD")
        if self.step_size is not None:
            nonneg_float(self.step_size, name="step_size", who="PGD")

    def _run(self, p: Problem) -> RunOutput:
        loss_fn = partial(get_loss(self.loss), targeted=p.targeted)
        n = len(p)
        step = (
            step_size_default(p.threat, p.x, self.steps)
            if self.step_size is None
            else torch.full((n,), float(self.step_size), device=p.x.device, dtype=p.x.dtype)
        )
        best = Best.highest(p.x)  # the first adversarial point, else the highest loss

        def restart(rows: Tensor, r: int) -> None:
            """One run from a random start (keyed by r) on the samples ``rows``."""
            q = p.select(rows)
            # with early stop, samples that became adversarial leave the batch at the next
            # compaction and ride along frozen until then (their ``run`` entries, found, take
            # nothing more; their passes are not charged)
            lanes = Lanes(q, every=None if self.early_stop else 1)
            q = lanes.start(q)
            xa = q.threat.random_init(q.x, q.rng, r) if self.random_start else q.x.clone()
            alpha = step[rows].view(-1, *([1] * (xa.dim() - 1)))  # (R,) -> (R, 1, ..., 1)
            # the run's best point per running sample, handed to ``best`` when samples leave
            run = Best.highest(xa)
            desc = f"{p.name} restart {r + 1}/{self.restarts}" if self.restarts > 1 else None
            for t in p.progress(self.steps, desc):
                loss, grad, logits = q.model.value_and_grad(
                    xa, loss_fn, q.labels, frozen=lanes.done
                )
                adv = q.is_adversarial(logits)
                run.update(xa, loss, adv)
                if self.early_stop:
                    lanes.done = run.found  # sticky: an adversarial point is kept
                    if lanes.due(t):
                        found = run.found
                        go = lanes.compact()
                        if go is not None:
                            best.offer(rows, run.x, run.score, found)
                            rows, xa, grad, q = rows[go], xa[go], grad[go], q.select(go)
                            alpha, run = alpha[go], run.select(go)
                            if rows.numel() == 0:
                                q.model.settle()
                                return
                direction = q.threat.steepest_ascent(grad, x_adv=xa)
                xa = q.threat.project(xa + alpha * direction, q.x)
            logits = q.model.logits(xa, frozen=lanes.done)  # the last step's point
            q.model.settle()
            run.update(xa, loss_fn(logits, q.labels), q.is_adversarial(logits))
            best.offer(rows, run.x, run.score, run.found)

        best.rounds(self.restarts, restart)  # each restart only on the samples still unbroken
        return best.output()
