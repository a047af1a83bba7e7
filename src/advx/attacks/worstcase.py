"""WorstCase: a cascade of attacks, each run only on the samples no earlier one broke."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._rng import derive_seed
from ..errors import InputError
from ..models._base import ACCESS_RANK
from ._base import Attack, Problem, RunOutput
from ._best import Best


@dataclass(eq=False, init=False)
class WorstCase(Attack):
    """Run ``attacks`` in order; each sees only the samples still unbroken, and each sample keeps
    the first successful example. Passes spent by every stage are charged to the samples.

        WorstCase([APGD(Linf(0.3)), APGD(Linf(0.3), loss="dlr-targeted"), Square(Linf(0.3))])

    All attacks must share the threat model. Stage k draws its random numbers from a seed derived
    from (seed, k), so adding a stage does not change the ones before it.
    """

    attacks: tuple[Attack, ...] = field(default=())

    def __init__(self, attacks: Sequence[Attack], *, seed: int = 0) -> None:
        attacks = tuple(attacks)
        if not attacks or not all(isinstance(a, Attack) for a in attacks):
            raise InputError(
                "WorstCase: expected a non-empty list of attacks such as [PGD(Linf(0.3)), ...]"
            )
        first = attacks[0].threat
        for a in attacks[1:]:
            if a.threat != first:
                raise InputError(
                    f"WorstCase: every attack needs the same threat model; {a.name} has "
                    f"{a.threat!r}, {attacks[0].name} has {first!r}"
                )
        self.attacks = attacks
        self.threat = first
        self.seed = seed
        # what the registry keeps on an attack's class, the cascade takes from its stages: it
        # needs the most any stage needs
        described = {
            "access": max((a.access for a in attacks), key=ACCESS_RANK.__getitem__),
            "supports_targeted": all(a.supports_targeted for a in attacks),
            "minimum_norm": all(a.minimum_norm for a in attacks),
            "name": "worstcase(" + ",".join(a.name for a in attacks) + ")",
        }
        for key, value in described.items():
            setattr(self, key, value)
        self.__post_init__()

    @property
    def params(self) -> dict[str, Any]:
        return {"attacks": [{"name": a.name, **a.params} for a in self.attacks], "seed": self.seed}

    def with_seed(self, seed: int) -> WorstCase:
        return WorstCase(self.attacks, seed=seed)

    def _run(self, p: Problem) -> RunOutput:
        best = Best.highest(p.x)  # the first stage's success; no loss to compare
        stage = torch.full((len(p),), -1, dtype=torch.long, device=p.x.device)

        def run(rows: Tensor, k: int) -> None:
            q = p.select(rows)
            attack = self.attacks[k]
            # a nested cascade keeps its own seed (it always has: stage streams stay as they were)
            if not isinstance(attack, WorstCase):
                attack = attack.with_seed(derive_seed(self.seed, k))
            r = attack(q.model.model, q.x, q.y, target=q.target, index=q.rng.index)
            q.model.add_counts(r.queries, r.grads)
            hit = best.offer(rows, r.x_adv, None, r.success)
            stage.index_copy_(0, rows, torch.where(hit, k, stage.index_select(0, rows)))

        best.rounds(len(self.attacks), run)  # each stage on the samples no earlier one broke
        return RunOutput(best.x, best.success, trace={"stage": stage})
