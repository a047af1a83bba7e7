"""What the guard says about one input: a typed decision, and a batch of them.

Every input gets exactly one :class:`Decision`, even a malformed one (``action="reject"`` with
the reason): a bad row never fails the rows beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["ACTIONS", "Action", "Decision", "Decisions"]

Action = Literal["accept", "abstain", "fallback", "review", "reject"]
# Ordered from the mildest to the strictest: when several rules fire, the strictest wins.
ACTIONS: tuple[Action, ...] = ("accept", "fallback", "abstain", "review", "reject")


@dataclass(frozen=True)
class Decision:
    """The guard's answer for one input.

    ``label`` is the class the caller may use (``None`` when the guard abstains or rejects;
    the fallback's class when ``action == "fallback"``); ``predicted`` is what the model said,
    kept for review. ``scores`` holds every detector's score (higher: more suspicious) and
    ``confidence``; ``reasons`` names each rule that fired, e.g. ``"feature_squeezing > 0.61"``.
    """

    action: Action
    label: int | None
    predicted: int | None
    confidence: float | None
    scores: dict[str, float] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    model_version: str = ""
    policy_hash: str = ""

    @property
    def accepted(self) -> bool:
        return self.action == "accept"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


class Decisions(Sequence[Decision]):
    """The decisions for a batch, in input order."""

    def __init__(self, items: Sequence[Decision]) -> None:
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __iter__(self) -> Iterator[Decision]:
        return iter(self._items)

    @property
    def actions(self) -> list[str]:
        return [d.action for d in self._items]

    @property
    def labels(self) -> list[int | None]:
        return [d.label for d in self._items]

    def count(self, action: str) -> int:
        return sum(d.action == action for d in self._items)

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self._items]

    def __repr__(self) -> str:
        counts = {a: self.count(a) for a in ACTIONS if self.count(a)}
        return f"Decisions({len(self)}: {counts})"
