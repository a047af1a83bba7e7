"""Inner loops without a host sync per iteration: done rows ride along, frozen, until compaction.

An inner loop with per-sample early stopping drops the samples that are done (adversarial,
inside the budget) before its next pass. Dropping them needs their number on the host
(``nonzero``): one host sync per iteration, which a GPU waits on. :class:`Lanes` keeps a done
mask on the device instead: a done row stays in the batch, frozen (the attack's ``torch.where``
updates leave its point, best point and state as they were), its passes are not charged (the
view's tab, :meth:`~advx.models._base.ModelView.padded`), and the batch is compacted only every
``every`` iterations. Frozen rows cost arithmetic, not results: for every ``every`` the
per-sample points, verdicts, losses and pass counts are those of ``every = 1``, which is
today's eager compaction.

The period is chosen per device type, once, here: :data:`COMPACT_EVERY`, overridden by the
environment variable ``ADVX_COMPACT_EVERY``. A model that is not
:attr:`~advx.models._base.Model.paddable` (a black box, an endpoint: its passes are real
queries) or that has a query budget is never padded: its loops compact every iteration.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from .._validate import env_count
from ._base import Problem

__all__ = ["COMPACT_EVERY", "ENV", "Lanes", "compact_every", "masked"]

# Iterations between compactions, per device type. On a CPU a pass costs what its rows cost and
# a host sync is free (the host is the device): padding only adds the frozen rows' arithmetic,
# so the batch is compacted eagerly, every iteration (measured in benchmarks/RESULTS.md, "Sync-
# free inner loops"). On a GPU the small kernels and the syncs dominate (issue 15): a sync every
# 16 iterations (<= 0.1 per iteration) for at most 15 iterations of frozen rows' arithmetic.
# Other device types: eager, until measured.
COMPACT_EVERY: dict[str, int] = {"cpu": 1, "cuda": 16}
ENV = "ADVX_COMPACT_EVERY"


def compact_every(p: Problem) -> int:
    """Iterations between compactions for the loops of ``p``: 1 (every iteration) where the
    model takes no frozen rows, else ``ADVX_COMPACT_EVERY`` or the device's entry in
    :data:`COMPACT_EVERY`."""
    view = p.model
    if not view.model.paddable or view.tracker.budget is not None:
        return 1
    every = env_count(ENV, what="iterations", one="compact every iteration")
    return COMPACT_EVERY.get(p.x.device.type, 1) if every is None else every


class Lanes:
    """The done mask of one inner loop and when to compact its batch.

    ``done`` (bool (R,), on the device) marks the rows that need no more work and ride along
    frozen; None while there is none (right after a compaction: the passes then charge every
    row). The loop passes ``frozen=lanes.done`` to its model passes, keeps frozen rows' state
    with ``torch.where``, updates ``done`` (:meth:`mark`, or by assigning its own sticky
    mask), and when :meth:`due` calls :meth:`compact`.
    """

    __slots__ = ("every", "done")

    def __init__(self, p: Problem, *, every: int | None = None) -> None:
        self.every = compact_every(p) if every is None else every
        self.done: Tensor | None = None

    @property
    def padded(self) -> bool:
        return self.every > 1

    def start(self, q: Problem) -> Problem:
        """``q`` with a view that takes frozen rows when this loop pads, else ``q``."""
        if not self.padded:
            return q
        return dataclasses.replace(q, model=q.model.padded())

    def mark(self, now: Tensor) -> Tensor:
        """Rows done from now on (bool (R,)); returns the done mask, sticky."""
        self.done = now if self.done is None else self.done | now
        return self.done

    def due(self, t: int) -> bool:
        """Whether the loop compacts after iteration ``t`` (0-based)."""
        return self.every == 1 or (t + 1) % self.every == 0

    def compact(self) -> Tensor | None:
        """The positions of the rows to keep, or None when no row is done (nothing to drop).

        One host sync (``nonzero``); ``done`` is reset: the rows kept are all running.
        """
        done, self.done = self.done, None
        if done is None:
            return None
        go = (~done).nonzero().view(-1)
        return None if go.numel() == done.numel() else go


def masked(adv: Tensor, frozen: Tensor | None) -> Tensor:
    """``adv`` with the frozen rows cleared: a frozen row's new candidates are never taken."""
    return adv if frozen is None else adv > frozen  # bools: True > False only, one kernel
