"""WorstCase: a cascade of attacks, each run only on the samples no earlier one broke."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._rng import derive_seed
from ..errors import InputError
from ..models._base import ACCESS_RANK
from ._base import Attack, Problem


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
        # the cascade needs the most any stage needs
        self.access = max((a.access for a in attacks), key=ACCESS_RANK.__getitem__)
        self.supports_targeted = all(a.supports_targeted for a in attacks)
        self.minimum_norm = all(a.minimum_norm for a in attacks)
        self.name = "worstcase(" + ",".join(a.name for a in attacks) + ")"
        self.__post_init__()

    @property
    def params(self) -> dict:
        return {"attacks": [{"name": a.name, **a.params} for a in self.attacks], "seed": self.seed}

    def _run(self, p: Problem):
        x_adv = p.x.clone()
        found = torch.zeros(len(p), dtype=torch.bool, device=p.x.device)
        stage = torch.full((len(p),), -1, dtype=torch.long, device=p.x.device)
        for k, attack in enumerate(self.attacks):
            rows = (~found).nonzero().view(-1)
            if rows.numel() == 0:
                break
            q = p.select(rows)
            seeded = _reseeded(attack, derive_seed(self.seed, k))
            r = seeded(q.model.model, q.x, q.y, target=q.target, index=q.rng.index)
            q.model.add_counts(r.queries, r.grads)
            hit = r.success
            x_adv[rows[hit]] = r.x_adv[hit]
            found[rows[hit]] = True
            stage[rows[hit]] = k
        return x_adv, found, {"stage": stage}


def _reseeded(attack: Attack, seed: int) -> Attack:
    import dataclasses

    return (
        dataclasses.replace(attack, seed=seed)
        if dataclasses.is_dataclass(attack) and not isinstance(attack, WorstCase)
        else attack
    )
