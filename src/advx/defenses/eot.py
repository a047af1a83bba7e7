"""Expectation over Transformation (Athalye et al., 2018): attack a randomized model through
its average over many random passes."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_int
from ._base import Defense, check_scores, graph

__all__ = ["EOT"]


class EOT(Defense):
    """The mean of ``n`` passes of a randomized ``model``: the logits are the mean of the n
    passes' logits, the loss and its gradient the mean of the n passes' losses and gradients
    (the gradient of the expected loss, estimated from n draws).

    Query accounting: every pass is a query of the deployed (randomized) model, so one query of
    ``EOT(model, n)`` costs ``n`` queries per sample (``n`` times the wrapped model's own cost):
    an attack's ``AttackResult.queries`` and ``grads`` count all of them, and the model's
    per-sample budget is spent n at a time.

    Inside another defense's graph (e.g. a detector-aware model over an EOT) the mean logits are
    differentiated instead: the gradient of the loss of the mean, not the mean of the gradients.
    """

    def __init__(self, model, n: int = 16) -> None:
        check_int(n, name="n", who="EOT", hint="passes per query")
        super().__init__(model, name=f"EOT(n={n})")
        check_scores(self.model, "EOT")
        self.n = n

    @property
    def query_cost(self) -> int:  # type: ignore[override]
        return self.n * self.model.query_cost

    def __repr__(self) -> str:
        return f"EOT({self.model!r}, n={self.n})"

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([graph(self.model, x) for _ in range(self.n)]).mean(dim=0)

    def scores(self, x: Tensor) -> Tensor:
        total = self.model.scores(x)
        for _ in range(self.n - 1):
            total = total + self.model.scores(x)
        return total / self.n

    def value_and_grad(self, x: Tensor, loss_fn, *args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # one pass at a time: memory does not grow with n
        value, grad, logits = self.model.value_and_grad(x, loss_fn, *args)
        for _ in range(self.n - 1):
            v, g, z = self.model.value_and_grad(x, loss_fn, *args)
            value, grad, logits = value + v, grad + g, logits + z
        return value / self.n, grad / self.n, logits / self.n
