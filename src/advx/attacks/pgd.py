"""PGD: projected gradient descent (Madry et al., 2018), with per-sample restarts and early stop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .._tensor import per_sample
from .._validate import nonneg_float, one_of, positive_int
from ._base import Attack, Problem, step_size_default
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

    def _run(self, p: Problem):
        loss_fn = partial(get_loss(self.loss), targeted=p.targeted)
        n = len(p)
        step = (
            step_size_default(p.threat, p.x, self.steps)
            if self.step_size is None
            else torch.full((n,), float(self.step_size), device=p.x.device, dtype=p.x.dtype)
        )
        best = p.x.clone()
        best_loss = torch.full((n,), float("-inf"), device=p.x.device, dtype=p.x.dtype)
        found = torch.zeros(n, dtype=torch.bool, device=p.x.device)

        def keep(rows, xa, loss, adv):
            """Per sample: the first adversarial point, else the one with the highest loss."""
            better = ~found[rows] & (adv | (loss > best_loss[rows]))
            best[rows[better]] = xa[better]
            best_loss[rows[better]] = loss[better]
            found[rows[adv]] = True

        for restart in range(self.restarts):
            rows = (~found).nonzero().view(-1)
            if rows.numel() == 0:
                break
            q = p.select(rows)
            xa = q.threat.random_init(q.x, q.rng, restart) if self.random_start else q.x.clone()
            for _ in p.progress(
                self.steps,
                f"{p.name} restart {restart + 1}/{self.restarts}" if self.restarts > 1 else None,
            ):
                loss, grad, logits = q.model.value_and_grad(xa, loss_fn, q.labels)
                adv = q.is_adversarial(logits)
                keep(rows, xa, loss, adv)
                if self.early_stop and bool(adv.any()):
                    go = (~adv).nonzero().view(-1)
                    rows, xa, grad, q = rows[go], xa[go], grad[go], q.select(go)
                    if rows.numel() == 0:
                        break
                direction = q.threat.steepest_ascent(grad, x_adv=xa)
                xa = q.threat.project(xa + per_sample(step[rows], xa) * direction, q.x)
            else:
                logits = q.model.logits(xa)  # the last step's point
                keep(rows, xa, loss_fn(logits, q.labels), q.is_adversarial(logits))
        return best, found
