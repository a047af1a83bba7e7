"""``attack.repeat(n)``: an attack run n times with fresh random streams, the best kept."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._rng import SampleRNG, derive_seed
from .._validate import positive_int
from ..errors import InputError
from ._base import Attack, Problem
from ._best import Best
from ._result import RunOutput

__all__ = ["Repeated"]


@dataclass(eq=False, init=False)
class Repeated(Attack):
    """``attack`` run ``times`` times; built by :meth:`Attack.repeat`.

    Repetition r (0-based) draws from the per-sample streams of seed ``derive_seed(seed, r)``
    (repetition 0 from ``seed`` itself, so that it is the attack as it is) and runs only on the
    samples no earlier repetition broke. A sample keeps the first repetition's success, else
    the point with the highest loss when the attack reports one (else the first repetition's).
    A minimum-norm attack with an infinite eps instead runs every repetition on every sample
    and keeps the closest success (with a finite eps any success inside it is as good). The
    result's ``trace["repetition"]`` says which repetition each sample's point comes from (-1:
    none was kept, the clean input).
    """

    attack: Attack
    times: int

    def __init__(self, attack: Attack, times: int, *, seed: int | None = None) -> None:
        if not isinstance(attack, Attack):
            raise InputError(f"repeat: expected an advx attack, got {type(attack).__name__}")
        positive_int(times, name="times", who="repeat")
        if isinstance(attack, Repeated):  # repeating a repetition: one longer run
            times = attack.times * times
            attack = attack.attack
        self.attack = attack
        self.times = times
        self.threat = attack.threat
        self.seed = attack.seed if seed is None else seed
        # what the registry keeps on an attack's class, this wrapper takes from the attack
        described = {
            "access": attack.access,
            "norms": attack.norms,
            "minimum_norm": attack.minimum_norm,
            "supports_targeted": attack.supports_targeted,
            "name": f"repeat({attack.name or type(attack).__name__},{times})",
        }
        for key, value in described.items():
            setattr(self, key, value)
        self.__post_init__()

    @property
    def params(self) -> dict[str, Any]:
        inner = {"name": self.attack.name, **self.attack.params}
        inner.pop("seed", None)
        return {"attack": inner, "times": self.times, "seed": self.seed}

    def with_seed(self, seed: int) -> Repeated:
        return Repeated(self.attack, self.times, seed=seed)

    def repeat(self, times: int) -> Repeated:
        return Repeated(self.attack, self.times * times, seed=self.seed)

    def _run(self, p: Problem) -> RunOutput:
        inner = self.attack
        closest = inner.minimum_norm and p.threat.unbounded
        best = Best.closest(p.x) if closest else Best.highest(p.x)
        kept = torch.full((len(p),), -1, dtype=torch.long, device=p.x.device)

        def run(rows: Tensor, r: int) -> None:
            seed = self.seed if r == 0 else derive_seed(self.seed, r)
            attack = inner.with_seed(seed)
            q = p.select(rows)
            q = dataclasses.replace(q, rng=SampleRNG(seed, q.rng.index))
            out = attack._run(q)
            x, ok = attack._finish(q, out.x_adv, out.success)
            if closest:
                taken = best.offer(rows, x, q.threat.distance(x, q.x), ok)
            elif out.loss is not None:
                taken = best.offer(rows, x, out.loss, ok)
            elif r == 0:  # no loss to compare: the first repetition's point, unless beaten
                taken = best.offer(rows, x, torch.zeros_like(best.score[rows]), ok)
            else:
                taken = best.offer(rows, x, None, ok)
            kept.index_copy_(0, rows, torch.where(taken, r, kept.index_select(0, rows)))

        best.rounds(self.times, run)
        return RunOutput(best.x, best.success, trace={"repetition": kept})
