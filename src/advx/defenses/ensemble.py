"""Ensembles: several classifiers answer as one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import one_of
from ..errors import InputError
from ..models._base import ACCESS_RANK, Access, Model
from ..models.classifier import as_model
from ._base import Defense, _min_access, check_same_bounds, check_scores, chunked, graph

__all__ = ["Ensemble"]

COMBINE = ("mean", "vote")


class Ensemble(Defense):
    """The members' combined answer.

    ``combine="mean"``: the mean of the members' softmax probabilities, returned as its log
    (log-probabilities serve as logits: softmax gives the mean probabilities back). It is
    differentiable: gradient attacks go through every member.

    ``combine="vote"``: majority vote. The scores are each class's share of the votes, plus the
    mean probability times ``0.5 / members`` to break ties (less than one vote, so it never
    overturns a majority). A vote is piecewise constant: it has no useful gradient, so a voting
    ensemble gives scores only and gradient attacks are refused (attack ``combine="mean"``, or
    use a score-based attack).

    Every member must give scores; they must share their bounds and their number of classes.
    One query of the ensemble queries every member once.
    """

    def __init__(self, members: Sequence, combine: str = "mean") -> None:
        if isinstance(members, Model) or not isinstance(members, (list, tuple)) or not members:
            raise InputError(
                "Ensemble: expected a non-empty list of models, e.g. Ensemble([model_a, model_b])"
            )
        one_of(combine, COMBINE, name="combine", who="Ensemble")
        self.members = [as_model(m) for m in members]
        for m in self.members:
            check_scores(m, "Ensemble")
        check_same_bounds(self.members, "Ensemble")
        super().__init__(self.members[0], name=f"Ensemble({combine})")
        self.combine = combine

    def _wrapped(self) -> list[Model]:
        return self.members

    @property
    def access(self) -> Access:  # type: ignore[override]
        access = _min_access(self.members)
        return (
            "scores"
            if self.combine == "vote" and ACCESS_RANK[access] > ACCESS_RANK["scores"]
            else access
        )

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        return next((m.num_classes for m in self.members if m.num_classes), None)

    def __repr__(self) -> str:
        return f"Ensemble([{', '.join(map(repr, self.members))}], combine={self.combine!r})"

    def _log_probs(self, x: Tensor) -> Tensor:
        """Each member's log-probabilities, (M, N, C)."""
        outs = [graph(m, x) for m in self.members]
        classes = {z.shape[1] for z in outs}
        if len(classes) > 1:
            raise InputError(
                f"Ensemble: the members return different numbers of classes {sorted(classes)}"
            )
        return torch.stack([F.log_softmax(z, dim=1) for z in outs])

    def forward(self, x: Tensor) -> Tensor:
        logp = self._log_probs(x)
        m = logp.shape[0]
        mean_logp = torch.logsumexp(logp, dim=0) - math.log(
            m
        )  # log of the mean probability, (N, C)
        if self.combine == "mean":
            return mean_logp
        votes = (
            F.one_hot(logp.argmax(dim=2), logp.shape[2]).to(logp.dtype).mean(dim=0)
        )  # (M, N) -> (N, C)
        return votes + mean_logp.exp() * (0.5 / m)

    def _disagreement(self, x: Tensor) -> Tensor:
        """Mean total-variation distance between each member's probabilities and the
        ensemble's mean, (N,); differentiable like ``forward``."""
        p = self._log_probs(x).exp()  # (M, N, C)
        return 0.5 * (p - p.mean(dim=0)).abs().sum(dim=2).mean(dim=0)  # (M, N, C) -> (N,)

    def disagreement(self, x: Tensor) -> Tensor:
        """How much the members disagree on each input, shape (N,).

        The mean, over members, of the total-variation distance between the member's softmax
        probabilities and the ensemble's mean probabilities: 0 when every member gives the same
        probabilities, at most 1 - 1/M (M members certain of M different classes). Unlike the
        share of dissenting votes it is continuous, which a detector's threshold needs.
        """
        x = self._checked(x)
        with self.prepared(), torch.no_grad():
            return chunked(self._disagreement, x, self.batch_size_for(x, grad=False))
