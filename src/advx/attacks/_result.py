"""What an attack returns."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..threat import ThreatModel

__all__ = ["AttackResult", "RunOutput"]


@dataclass(frozen=True, eq=False)
class RunOutput:
    """What an attack's ``_run`` returns, for the samples of its problem (N rows).

    Attributes:
        x_adv: the candidates (N, ...); the base class projects them onto the threat model.
        success: bool (N,) when the attack already knows which are adversarial (saves a pass);
            None to let the base class score them.
        loss: (N,) the attack's loss at ``x_adv`` (larger is better for the attacker), when it
            has one: :meth:`Attack.repeat` keeps, for a sample no repetition broke, the point
            with the highest loss (without it, the first repetition's).
        trace: goes to ``AttackResult.trace``: its tensors are per sample (first dimension N)
            and are spread over the whole batch; other values pass as given.
    """

    x_adv: Tensor
    success: Tensor | None = None
    loss: Tensor | None = None
    trace: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class AttackResult:
    """The outcome of one attack on a batch, per sample.

    Attributes:
        x_adv: the adversarial examples, shape and dtype of the inputs; inside the threat model.
        success: bool (N,): misclassified (untargeted) or classified as the target (targeted).
        distance: (N,) distance to the clean input in the threat's norm.
        queries: int64 (N,) forward passes spent on each sample (the clean check included).
        grads: int64 (N,) backward passes spent on each sample.
        name, params: the attack and its hyper-parameters.
        threat: the threat model the result is inside.
        target: the target classes, or None for an untargeted attack.
        seconds: wall time of the call.
        trace: what the attack records on the way, e.g. the best distance at query checkpoints
            of the decision-based attacks. Tensors in it are per sample (first dimension N);
            other values are shared by the batch.
    """

    x_adv: Tensor
    success: Tensor
    distance: Tensor
    queries: Tensor
    grads: Tensor
    name: str
    params: dict[str, Any]
    threat: ThreatModel
    target: Tensor | None = None
    seconds: float = 0.0
    trace: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.success.numel()

    @property
    def targeted(self) -> bool:
        return self.target is not None

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if len(self) else math.nan

    @property
    def robust_accuracy(self) -> float:
        """Share of samples the attack did not break (untargeted: still correctly classified)."""
        return 1.0 - self.success_rate

    def select(self, idx: Tensor) -> AttackResult:
        """The result restricted to some samples."""
        target = None if self.target is None else self.target[idx]
        return dataclasses.replace(
            self,
            x_adv=self.x_adv[idx],
            success=self.success[idx],
            distance=self.distance[idx],
            queries=self.queries[idx],
            grads=self.grads[idx],
            target=target,
            threat=self.threat.select(idx) if self.threat.per_sample else self.threat,
            trace={k: v[idx] if isinstance(v, Tensor) else v for k, v in self.trace.items()},
        )

    @property
    def already_adversarial(self) -> Tensor:
        """bool (N,): samples adversarial before the attack moved them (misclassified, or already
        the target): the attack never ran on them, and their ``x_adv`` is the clean input."""
        # the base class leaves x_adv = x for them, so their distance is exactly 0; a point the
        # attack moved has a positive distance
        return self.success & (self.distance == 0)

    def summary(self) -> dict[str, Any]:
        """Success rate, the points already adversarial apart from those the attack broke,
        distances and queries over the broken ones, counts, time.

        ``success_rate`` is the share of all samples adversarial at ``x_adv`` (1 - robust
        accuracy); ``attack_success_rate`` the share of the ``attacked`` samples (those not
        already adversarial) that the attack ``broke``.
        """
        already = self.already_adversarial
        broken = self.success & ~already
        attacked = len(self) - int(already.sum())
        d = self.distance[broken].double()
        q_ok = self.queries[broken].double()
        return {
            "attack": self.name,
            "threat": str(self.threat),
            "targeted": self.targeted,
            "n": len(self),
            "already_adversarial": int(already.sum()),
            "attacked": attacked,
            "broken": int(broken.sum()),
            "attack_success_rate": int(broken.sum()) / attacked if attacked else None,
            "success_rate": self.success_rate,
            "robust_accuracy": self.robust_accuracy,
            "median_distance": float(d.median()) if d.numel() else None,
            "mean_distance": float(d.mean()) if d.numel() else None,
            "median_queries": float(q_ok.median()) if q_ok.numel() else None,
            "mean_queries": float(q_ok.mean()) if q_ok.numel() else None,
            "queries": int(self.queries.sum()),
            "grads": int(self.grads.sum()),
            "seconds": round(self.seconds, 4),
        }

    def __repr__(self) -> str:
        s = self.summary()
        med = "-" if s["median_distance"] is None else f"{s['median_distance']:.4g}"
        already = (
            f", {s['already_adversarial']} already adversarial" if s["already_adversarial"] else ""
        )
        return (
            f"AttackResult({self.name}, {self.threat!r}, n={s['n']}, "
            f"broke {s['broken']} of {s['attacked']} attacked{already}, "
            f"success={s['success_rate']:.1%}, median distance={med}, "
            f"queries={s['queries']}, grads={s['grads']}, {s['seconds']:.2f}s)"
        )


def concat_results(results: list[AttackResult]) -> AttackResult:
    """Join the results of one attack on consecutive batches into one result."""
    if not results:
        raise ValueError("concat_results: no results")
    first = results[0]
    cat = lambda name: torch.cat([getattr(r, name) for r in results])
    threat = first.threat
    if threat.per_sample:
        threat = threat.with_eps(torch.cat([_eps_of(r) for r in results]))
    return dataclasses.replace(
        first,
        x_adv=cat("x_adv"),
        success=cat("success"),
        distance=cat("distance"),
        queries=cat("queries"),
        grads=cat("grads"),
        threat=threat,
        target=None if first.target is None else cat("target"),
        seconds=sum(r.seconds for r in results),
        trace=_concat_traces(results),
    )


def _eps_of(r: AttackResult) -> Tensor:
    """The per-sample eps of a result, (N,) (a scalar eps repeated)."""
    eps = r.threat.eps
    return eps if isinstance(eps, Tensor) else torch.full((len(r),), float(eps))


def _concat_traces(results: list[AttackResult]) -> dict[str, Any]:
    """Per-sample trace tensors joined; keys missing from a batch (one whose samples were all
    misclassified already has no trace) are dropped; other values from the first batch."""
    keys = [k for k in results[0].trace if all(k in r.trace for r in results)]
    return {
        k: torch.cat([r.trace[k] for r in results])
        if isinstance(results[0].trace[k], Tensor)
        else results[0].trace[k]
        for k in keys
    }
