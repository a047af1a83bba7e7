"""The cascade runner: per-sample state saved as it goes, resumable, shardable across processes.

Work is cut into units (one stage of the cascade on one chunk of the samples still robust); the
state is written atomically after each unit. Every per-sample outcome depends only on (seed,
stage, sample index), so a resumed run, a run with another chunk size, and a run split across
processes all give the same per-sample results.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._distributed import Group, current_group
from .._io import atomic_open
from .._progress import bar
from ..attacks import Attack
from ..errors import InputError
from ..models._base import ACCESS_RANK, ModelView, Tracker

log = logging.getLogger("advx")

__all__ = ["CascadeState", "run_cascade", "gather_states"]

_STATE_VERSION = 2


@dataclass
class CascadeState:
    """Per-sample outcome of a cascade over N samples and K stages (CPU tensors)."""

    n: int
    stages: int
    clean_done: bool
    clean_correct: Tensor  # bool (N,), valid once clean_done
    clean_pred: Tensor  # long (N,), valid once clean_done
    broken_by: Tensor  # long (N,), -1: not broken
    stage_done: Tensor  # bool (K, N)
    distance: Tensor  # float64 (N,), nan where not broken
    queries: Tensor  # long (K + 1, N); row 0 is the clean pass
    grads: Tensor  # long (K + 1, N)
    seconds: Tensor  # float64 (K + 1,)
    x_adv: Tensor  # (N, ...) adversarial examples of the broken samples, else x; (0,) before
    # logit margin (true class minus the best other) at the best point each stage found on each
    # sample it did not break; +inf where not measured. Only measured for gated suites.
    margin: Tensor  # float64 (K, N)
    gate: Tensor  # float64 (K,): each gated stage's margin threshold, nan if none

    @classmethod
    def empty(cls, n: int, stages: int) -> CascadeState:
        """The state before any pass: nothing classified, nothing broken."""
        k = stages
        return cls(
            n=n,
            stages=k,
            clean_done=False,
            clean_correct=torch.zeros(n, dtype=torch.bool),
            clean_pred=torch.zeros(n, dtype=torch.long),
            broken_by=torch.full((n,), -1, dtype=torch.long),
            stage_done=torch.zeros(k, n, dtype=torch.bool),
            distance=torch.full((n,), float("nan"), dtype=torch.float64),
            queries=torch.zeros(k + 1, n, dtype=torch.long),
            grads=torch.zeros(k + 1, n, dtype=torch.long),
            seconds=torch.zeros(k + 1, dtype=torch.float64),
            x_adv=torch.zeros(0),
            margin=torch.full((k, n), float("inf"), dtype=torch.float64),
            gate=torch.full((k,), float("nan"), dtype=torch.float64),
        )

    @property
    def robust(self) -> Tensor:
        return self.clean_correct & (self.broken_by < 0)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CascadeState:
        return replace(cls.empty(d["n"], d["stages"]), **d)


# The per-sample fields of a CascadeState, and the axis that indexes the samples in each.
_SAMPLE_AXIS = {
    "clean_correct": 0,
    "clean_pred": 0,
    "broken_by": 0,
    "stage_done": 1,
    "distance": 0,
    "queries": 1,
    "grads": 1,
    "x_adv": 0,
    "margin": 1,
}


# ---- state file ----------------------------------------------------------------------------
def _load_state(
    path: Path, fingerprint: dict[str, Any], *, mismatch: str = "error"
) -> CascadeState | None:
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"resume: cannot read the state file {path} ({type(e).__name__}); delete it to start "
            "afresh"
        ) from None
    if not isinstance(blob, dict) or blob.get("version") != _STATE_VERSION:
        raise InputError(
            f"resume: {path} is not an advx audit state file (or from another version); delete it "
            "to start afresh"
        )
    old = blob["fingerprint"]
    differ = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if differ and mismatch == "restart":
        log.warning("%s is from a different %s; starting afresh", path, ", ".join(differ))
        return None
    if differ:
        what = "; ".join(
            f"{k}: {_short(old.get(k))} in the file, {_short(fingerprint[k])} now" for k in differ
        )
        raise InputError(
            f"resume: {path} was written for a different {', '.join(differ)} ({what}); pass "
            "another --resume path or delete the file to start afresh"
        )
    return CascadeState.from_dict(blob["state"])


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] + "…" if len(s) > 40 else s


def _save_state(path: Path, fingerprint: dict[str, Any], state: CascadeState) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(
            {"version": _STATE_VERSION, "fingerprint": fingerprint, "state": state.to_dict()}, f
        )


# ---- the cascade -----------------------------------------------------------------------------
def run_cascade(
    model,
    x: Tensor,
    y: Tensor,
    attacks: list[Attack],
    *,
    index: Tensor | None = None,
    state_path: str | os.PathLike | None = None,
    fingerprint: dict[str, Any] | None = None,
    batch_size: int = 500,
    desc: str = "audit",
    mismatch: str = "error",
    closest: list[float | None] | None = None,
) -> CascadeState:
    """Run ``attacks`` in order on (x, y); each stage only on the samples still robust.

    ``index`` holds the global sample ids (they key the random streams); with ``state_path`` the
    state is loaded from it when it exists (and matches ``fingerprint``; else an error, or a fresh
    start with ``mismatch="restart"``) and saved after each unit.

    ``closest[k] = c`` runs stage k only on the fraction c of the samples still robust whose
    logit margin, at the best points the earlier stages found, is smallest (the samples closest
    to breaking; across all processes under torchrun). The margins are saved with the state,
    so a resumed or sharded run gates the same samples.
    """
    n = x.shape[0]
    index = torch.arange(n) if index is None else index.cpu()
    path = Path(state_path) if state_path is not None else None
    fingerprint = fingerprint or {}
    state = _load_state(path, fingerprint, mismatch=mismatch) if path is not None else None
    if state is not None:
        log.info("resuming from %s", path)
    else:
        state = CascadeState.empty(n, len(attacks))
    if state.n != n or state.stages != len(attacks):
        raise InputError(
            f"resume: the state file holds {state.n} samples and {state.stages} stages, this run "
            f"has {n} and {len(attacks)}"
        )

    def save() -> None:
        if path is not None:
            _save_state(path, fingerprint, state)

    dev = x.device
    if not state.clean_done:
        t0 = time.perf_counter()
        tracker = Tracker(n, dev)
        view = ModelView(model, tracker)
        with model.prepared():
            if ACCESS_RANK[model.access] >= ACCESS_RANK["scores"]:
                pred = torch.cat(
                    [
                        view.select(torch.arange(b, min(b + batch_size, n), device=dev))
                        .logits(x[b : b + batch_size])
                        .argmax(1)
                        for b in range(0, n, batch_size)
                    ]
                )
            else:
                pred = torch.cat(
                    [
                        view.select(torch.arange(b, min(b + batch_size, n), device=dev)).labels(
                            x[b : b + batch_size]
                        )
                        for b in range(0, n, batch_size)
                    ]
                )
        state.clean_pred = pred.cpu()
        state.clean_correct = (pred == y).cpu()
        state.queries[0] += tracker.queries.cpu()
        state.seconds[0] += time.perf_counter() - t0
        state.x_adv = x.detach().cpu().clone()
        state.clean_done = True
        save()

    closest = list(closest or [None] * len(attacks))
    if len(closest) != len(attacks):
        raise InputError(
            f"closest: one entry per stage expected ({len(attacks)}), got {len(closest)}"
        )
    has_scores = ACCESS_RANK[model.access] >= ACCESS_RANK["scores"]
    if any(c is not None for c in closest) and not has_scores:
        log.warning(
            "the suite gates stages by logit margin, but the model gives labels only: every stage "
            "runs on all samples"
        )
        closest = [None] * len(attacks)

    total = int(state.clean_correct.sum()) * len(attacks)
    done_units = int((state.stage_done & state.clean_correct).sum())
    with bar(total=total, desc=desc, unit="sample", initial=done_units) as progress:
        for k, attack in enumerate(attacks):
            track = any(c is not None for c in closest[k + 1 :])  # a later stage needs the margins
            todo = state.clean_correct & (state.broken_by < 0) & ~state.stage_done[k]
            share = closest[k]
            if share is not None:
                # From what the finished earlier stages measured on the samples still robust when
                # this stage began: the same on a resumed run, and on every shard (a collective,
                # so every process computes it, with work left or not).
                alive = state.clean_correct & ((state.broken_by < 0) | (state.broken_by >= k))
                reached = state.margin[:k].amin(dim=0) if k else state.margin[0]
                state.gate[k] = _threshold(reached[alive], share)
                todo &= reached <= state.gate[k]
            todo = todo.nonzero().view(-1)
            skipped = int((state.clean_correct & ~state.stage_done[k]).sum()) - todo.numel()
            for b in range(0, todo.numel(), batch_size):
                rows = todo[b : b + batch_size]
                rows_dev = rows.to(dev)
                t0 = time.perf_counter()
                r = attack(model, x[rows_dev], y[rows_dev], index=index[rows].to(dev))
                hit = r.success.cpu()
                state.queries[k + 1, rows] += r.queries.cpu()
                state.grads[k + 1, rows] += r.grads.cpu()
                if track and not bool(hit.all()):
                    miss = (~hit).nonzero().view(-1)
                    m, spent = _margins(model, r.x_adv[miss.to(dev)], y[rows_dev[miss.to(dev)]])
                    state.margin[k, rows[miss]] = m
                    state.queries[k + 1, rows[miss]] += spent
                state.seconds[k + 1] += time.perf_counter() - t0
                state.broken_by[rows[hit]] = k
                state.distance[rows[hit]] = r.distance.cpu()[hit].double()
                state.x_adv[rows[hit]] = r.x_adv.detach().cpu()[hit].to(state.x_adv.dtype)
                state.stage_done[k, rows] = True
                save()
                progress.update(rows.numel())
            if share is not None:  # the gated-out samples are done with this stage too
                state.stage_done[k] |= state.clean_correct & (state.broken_by < 0)
            # samples broken by an earlier stage count as done for this one
            state.stage_done[k] |= (
                state.clean_correct & (state.broken_by >= 0) & (state.broken_by < k)
            )
            progress.update(skipped)
    save()
    return state


def _margins(model, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Logit margin (true class minus the best other) at x_adv, float64 (R,) on the CPU, and the
    forward passes it cost per row."""
    tracker = Tracker(x_adv.shape[0], x_adv.device)
    with model.prepared():
        z = ModelView(model, tracker).logits(x_adv)
    true = z.gather(1, y.view(-1, 1)).view(-1)
    other = z.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return (true - other).double().cpu(), tracker.queries.cpu()


def _threshold(margins: Tensor, fraction: float) -> float:
    """The margin below which (inclusive) lie the ``fraction`` smallest margins of the samples
    still robust -- of every process's samples under torchrun, so that the shards agree."""
    parts = current_group().all_gather(margins.tolist())
    values = torch.tensor([v for part in parts for v in part], dtype=torch.float64)
    if values.numel() == 0:
        return float("inf")
    count = max(1, math.ceil(fraction * values.numel()))
    return float(values.sort().values[count - 1])


def gather_states(state: CascadeState, group: Group, n: int) -> CascadeState | None:
    """Merge the shards' states on rank 0 (None on the other ranks)."""
    if group.world == 1:
        return state
    parts = group.gather(state.to_dict())
    if parts is None:
        return None
    shards = [CascadeState.from_dict(blob) for blob in parts]
    merged = CascadeState.empty(n, state.stages)
    merged.clean_done = True
    x_adv = shards[0].x_adv
    merged.x_adv = torch.zeros((n, *x_adv.shape[1:]), dtype=x_adv.dtype)
    merged.seconds = torch.zeros_like(shards[0].seconds)
    for r, part in enumerate(shards):
        rows = Group(r, group.world).shard(n)
        for name, axis in _SAMPLE_AXIS.items():
            getattr(merged, name).index_copy_(axis, rows, getattr(part, name))
        merged.gate = part.gate  # the same on every shard (computed from all of their margins)
        merged.seconds = torch.maximum(merged.seconds, part.seconds)  # wall time: the slowest shard
    return merged
