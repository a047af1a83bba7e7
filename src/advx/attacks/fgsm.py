"""FGSM: the fast gradient method (Goodfellow, Shlens & Szegedy, 2015)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from .._validate import one_of
from ._base import Attack, Problem, RunOutput
from ._losses import LOSSES, get_loss
from ._registry import register


@register("fgsm")
@dataclass(kw_only=True, eq=False)
class FGSM(Attack):
    """One step: the point of the threat model that maximizes the loss's linearization at x.

    Linf: x + eps * sign(grad), as in the paper. L2 and L1: the exact maximizer over the ball
    intersected with the box (a normalized gradient step for L2, eps spent on the coordinates
    of largest gradient for L1).
    """

    loss: str = "ce"

    def _check(self) -> None:
        one_of(self.loss, tuple(LOSSES), name="loss", who="FGSM")

    def _run(self, p: Problem) -> RunOutput:
        loss_fn = partial(get_loss(self.loss), targeted=p.targeted)
        _, grad, _ = p.model.value_and_grad(p.x, loss_fn, p.labels)
        return RunOutput(p.threat.maximize_linear(grad, p.x))
