"""The runs of a per-sample cascade side by side in one batch: APGD-T's and FAB-T's targets.

APGD-T tries its targets one after another, each on the samples no earlier target broke; so do
FAB-T and APGD's restarts. On a GPU an inner loop costs its kernel launches, whatever its rows:
nine runs of 100 steps pay them nine times. :func:`cascade` runs a group of consecutive runs in
one batch instead (run j's copy of sample s is row ``j * m + s``) and pays them once.

Nothing a user sees changes. Each run starts from its own draws (made per run, before the rows
are fanned out), a row's passes do not depend on the rows beside it, and run j's outcome is
offered, and its passes are charged, only to the samples no earlier run finished: what the
sequential cascade would have run. The price is arithmetic: a sample broken by its first target
still runs the others of its group, and their results are thrown away. A GPU bound by its
overhead absorbs that; a CPU pays it in full (up to ``runs`` times the work where every sample
breaks early). Hence one run at a time on the CPU, by default (:data:`RUNS_AT_ONCE`, overridden
by ``ADVX_RUNS_AT_ONCE``), and never for a model whose passes are real queries (a black box, an
endpoint: not :attr:`~advx.models._base.Model.paddable`) or that has a query budget (checked
before each pass, sample by sample, in the order of the cascade).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._memory import rows_that_fit
from .._validate import env_count
from ..models._base import ModelView, Tracker
from ._base import Problem
from ._best import Best

__all__ = ["ENV", "RUNS_AT_ONCE", "cascade", "fan_out", "runs_at_once"]

# Consecutive runs in one batch, per device type (1: one after another). Other device types:
# one at a time, until measured.
RUNS_AT_ONCE: dict[str, int] = {"cpu": 1, "cuda": 9}
ENV = "ADVX_RUNS_AT_ONCE"
# On a GPU a group is also bounded by memory: the wide batch's state (the attacks keep some
# STATE_COPIES tensors of the batch's shape: points, best points, gradients, momentum, steps)
# may take this share of the device's free memory, measured when the group is formed.
MEMORY_SHARE = 0.25
STATE_COPIES = 16


def runs_at_once(p: Problem, runs: int) -> int:
    """How many consecutive runs of a cascade over ``p`` go in one batch (1: one at a time)."""
    view = p.model
    if runs <= 1 or not view.model.paddable or view.tracker.budget is not None:
        return 1
    at_once = env_count(ENV, what="runs", one="one run after another")
    if at_once is None:
        at_once = RUNS_AT_ONCE.get(p.x.device.type, 1)
    at_once = min(at_once, runs)
    if at_once > 1 and len(p):
        per_run = len(p) * p.x[0].numel() * p.x.element_size() * STATE_COPIES
        at_once = rows_that_fit(p.x.device, per_run, share=MEMORY_SHARE, at_most=at_once)
    return at_once


def fan_out(q: Problem, copies: int) -> Problem:
    """``copies`` copies of every sample of ``q``, copy-major (copy j of sample s is row
    ``j * len(q) + s``), on a view with a tracker of its own: :func:`cascade` decides which of
    the copies' passes the samples are charged. The copies of a sample share its random
    streams: draws that differ by run are made per run, before fanning out."""
    rep = torch.arange(len(q), device=q.x.device).repeat(copies)
    tracker = Tracker(len(rep), q.x.device, label=q.model.tracker.label)
    return dataclasses.replace(q.select(rep), model=ModelView(q.model.model, tracker))


def cascade(
    best: Best,
    p: Problem,
    runs: int,
    one: Callable[[Tensor, int], object],
    many: Callable[[Problem, Tensor, Problem, Sequence[int]], Best],
    *,
    at_once: int,
    everyone: bool = False,
) -> None:
    """Runs 0 .. ``runs`` - 1 of a cascade over ``p``, each on the samples not ``done`` in
    ``best`` (with ``everyone``: on all of them), ``at_once`` consecutive runs per batch: the
    groups are the rounds of :meth:`Best.rounds`.

    ``one(rows, i)`` runs run i alone on the samples ``rows`` and offers to ``best``.
    ``many(q, rows, wide, group)`` runs the runs ``group`` side by side on ``wide``
    (:func:`fan_out` of ``q = p.select(rows)``, one copy per run, in order) and returns each
    row's outcome, a :class:`Best` of ``len(wide)`` rows. Run j's outcome is then offered, and
    its passes charged, to the samples no earlier run finished.
    """
    step = max(1, at_once)
    groups = [range(first, min(first + step, runs)) for first in range(0, runs, step)]

    def run(rows: Tensor, g: int) -> None:
        group = groups[g]
        if len(group) == 1:
            one(rows, group[0])
            return
        q = p.select(rows)
        m = len(q)
        wide = fan_out(q, len(group))
        out = many(q, rows, wide, group)
        wide.model.settle()
        queries = wide.model.tracker.queries.view(len(group), m)
        grads = wide.model.tracker.grads.view(len(group), m)
        spent_q = torch.zeros_like(queries[0])
        spent_g = torch.zeros_like(grads[0])
        for j in range(len(group)):
            # the samples run group[j] runs on in the sequential cascade
            ran = torch.ones_like(rows, dtype=torch.bool) if everyone else ~best.done(rows)
            spent_q += torch.where(ran, queries[j], 0)
            spent_g += torch.where(ran, grads[j], 0)
            part = slice(j * m, (j + 1) * m)
            best.offer(rows, out.x[part], out.score[part], out.found[part] & ran)
        q.model.add_counts(spent_q, spent_g)

    best.rounds(len(groups), run, everyone=everyone)
