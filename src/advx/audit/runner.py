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
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._distributed import Group, current_group
from .._io import atomic_open
from .._memory import rows_that_fit
from .._progress import bar
from ..attacks import Attack
from ..attacks._side import RUNS_AT_ONCE, STATE_COPIES
from ..data.prefetch import Mover, prefetch
from ..data.sources import Source, as_source
from ..errors import InputError
from ..models._base import ACCESS_RANK, ModelView, Tracker
from .adversarial import AdvStore

log = logging.getLogger("advx")

__all__ = ["CascadeState", "run_cascade", "gather_states"]

_STATE_VERSION = 3

# How often the resume state is written while an audit runs (it is always written at the end).
SAVE_EVERY_S = 5.0

# Read the next chunk in a background thread while the current one is attacked (the per-sample
# results are the same either way; off, the chunks are read in turn).
PREFETCH = True


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
    # where each broken sample's adversarial example lies in the adversarial-examples file
    # (an AdvStore: written as found, never held in memory); -1 where not broken
    adv_slot: Tensor  # long (N,)
    adv_count: int  # records in that file this state accounts for
    # logit margin (true class minus the best other) at the best point each stage found on each
    # sample it did not break; +inf where not measured. Only measured for gated suites.
    margin: Tensor  # float64 (K, N)
    gate: Tensor  # float64 (K,): each gated stage's margin threshold, nan if none
    # the file the adversarial examples are in (not saved with the state: it is its own file)
    store: AdvStore | None = field(default=None, repr=False, compare=False)

    def x_adv(self, rows: Tensor) -> Tensor:
        """The adversarial examples of the broken samples at ``rows`` (CPU)."""
        if self.store is None:
            raise RuntimeError("no adversarial-examples file attached to this state")
        return self.store.read(self.adv_slot[rows])

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
            adv_slot=torch.full((n,), -1, dtype=torch.long),
            adv_count=0,
            margin=torch.full((k, n), float("inf"), dtype=torch.float64),
            gate=torch.full((k,), float("nan"), dtype=torch.float64),
        )

    @property
    def robust(self) -> Tensor:
        return self.clean_correct & (self.broken_by < 0)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "store"}

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
UNIT = 500  # samples per unit of work on a CPU (and the least on a GPU)
# On a GPU every unit pays each stage's per-iteration overhead once, whatever its samples (issue
# 15): a unit holds as many as fit in UNIT_SHARE of the free memory with a stage's state (the
# attacks' STATE_COPIES per sample, for each of the runs that go side by side), up to UNIT_MAX.
UNIT_MAX = 10_000
UNIT_SHARE = 0.25


def unit_size(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Samples per unit of work when the caller gives no ``batch_size``: :data:`UNIT` on a
    CPU, on a GPU as many as its free memory holds (between UNIT and UNIT_MAX)."""
    if device.type != "cuda":
        return UNIT
    sample = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    row = sample * STATE_COPIES * RUNS_AT_ONCE.get(device.type, 1)
    return rows_that_fit(device, row, share=UNIT_SHARE, at_least=UNIT, at_most=UNIT_MAX)


def run_cascade(
    model,
    x: Tensor | Source,
    y: Tensor,
    attacks: list[Attack],
    *,
    index: Tensor | None = None,
    state_path: str | os.PathLike | None = None,
    fingerprint: dict[str, Any] | None = None,
    batch_size: int | None = None,
    desc: str = "audit",
    mismatch: str = "error",
    closest: list[float | None] | None = None,
    device: torch.device | None = None,
) -> CascadeState:
    """Run ``attacks`` in order on (x, y); each stage only on the samples still robust.

    ``x`` is a tensor of images, or a :class:`~advx.data.sources.Source` read chunk by chunk
    (``y`` then holds its labels, and each chunk moves to ``device``, the model's, when it is
    attacked): memory holds per-sample scalars and a few chunks, whatever N. The adversarial
    examples go to a file as they are found (``state_path + ".adv"``, else a temporary file):
    ``state.x_adv(rows)`` reads them back.

    ``index`` holds the global sample ids (they key the random streams); with ``state_path`` the
    state is loaded from it when it exists (and matches ``fingerprint``; else an error, or a fresh
    start with ``mismatch="restart"``) and saved after each unit.

    ``closest[k] = c`` runs stage k only on the fraction c of the samples still robust whose
    logit margin, at the best points the earlier stages found, is smallest (the samples closest
    to breaking; across all processes under torchrun). The margins are saved with the state,
    so a resumed or sharded run gates the same samples.
    """
    if isinstance(x, Tensor):
        source: Source = as_source(x, y, bounds=getattr(model, "bounds", (0.0, 1.0)))
        dev = x.device
        n = x.shape[0]
        shape, dtype = tuple(x.shape[1:]), x.dtype
    else:
        source = x
        dev = torch.device(device) if device is not None else _model_device(model)
        scan = source.scan(batch_size or UNIT)
        n, shape, dtype = scan.n, scan.shape, scan.dtype
    if batch_size is None:
        batch_size = unit_size(dev, shape, dtype)
    y_cpu = y.cpu()
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
    state.store = AdvStore(
        Path(f"{path}.adv") if path is not None else None,
        shape=shape,
        dtype=dtype,
        count=state.adv_count,
    )

    last_save = [time.monotonic()]

    def save(*, force: bool = False) -> None:
        # At most every SAVE_EVERY_S seconds (and at the end): the state holds every sample's
        # numbers, so writing it after each chunk made the I/O grow with N squared. An
        # interrupted audit redoes at most those seconds of work when resumed.
        if path is None or not (force or time.monotonic() - last_save[0] >= SAVE_EVERY_S):
            return
        state.store.flush()  # type: ignore[union-attr]  # the examples before the state
        _save_state(path, fingerprint, state)
        last_save[0] = time.monotonic()

    mover = Mover(dev)

    def read(rows: Tensor) -> Generator[tuple[Tensor, Any, Any], None, None]:
        # runs in the prefetch thread: the next chunk is read, collated and (to a GPU) copied
        # while the current one is attacked
        for _, part, xb, yb in source.select(rows, batch_size=batch_size):
            if not source.random_access and not torch.equal(yb.cpu(), y_cpu[part]):
                raise InputError(
                    "data: the samples came in another order than on the first pass; the source "
                    "must give the same samples in the same order every time (a DataLoader with "
                    "shuffle=False)"
                )
            yield part, mover.send(xb), mover.send(y_cpu[part])

    @contextmanager
    def chunks(rows: Tensor):
        """(rows, x on the model's device, y on it) for the samples at ``rows``; the reader
        stops as soon as the caller leaves (an error, an interrupt)."""
        ahead = prefetch(read(rows)) if PREFETCH else read(rows)
        try:
            yield ((part, mover.receive(xs), mover.receive(ys)) for part, xs, ys in ahead)
        finally:
            ahead.close()

    if not state.clean_done:
        t0 = time.perf_counter()
        tracker = Tracker(n, dev)
        view = ModelView(model, tracker)
        scores = ACCESS_RANK[model.access] >= ACCESS_RANK["scores"]
        preds = []
        with model.prepared():
            with chunks(torch.arange(n)) as clean_chunks:
                for part, xb, _ in clean_chunks:
                    v = view.select(part.to(dev))
                    preds.append((v.logits(xb).argmax(1) if scores else v.labels(xb)).cpu())
        pred = torch.cat(preds)
        state.clean_pred = pred
        state.clean_correct = pred == y_cpu
        state.queries[0] += tracker.queries.cpu()
        state.seconds[0] += time.perf_counter() - t0
        state.clean_done = True
        save(force=True)

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
            with chunks(todo) as stage_chunks:
                for rows, xb, yb in stage_chunks:
                    t0 = time.perf_counter()
                    r = attack(model, xb, yb, index=index[rows].to(dev))
                    hit = r.success.cpu()
                    state.queries[k + 1, rows] += r.queries.cpu()
                    state.grads[k + 1, rows] += r.grads.cpu()
                    if track and not bool(hit.all()):
                        miss = (~hit).nonzero().view(-1)
                        m, spent = _margins(model, r.x_adv[miss.to(dev)], yb[miss.to(dev)])
                        state.margin[k, rows[miss]] = m
                        state.queries[k + 1, rows[miss]] += spent
                    state.seconds[k + 1] += time.perf_counter() - t0
                    state.broken_by[rows[hit]] = k
                    state.distance[rows[hit]] = r.distance.cpu()[hit].double()
                    if bool(hit.any()):
                        found = r.x_adv.detach()[hit.to(dev)].cpu().to(dtype)
                        state.adv_slot[rows[hit]] = state.store.append(found)
                        state.adv_count = state.store.count
                    state.stage_done[k, rows] = True
                    del r, xb, yb  # before the next chunk's attack allocates its own
                    save()
                    progress.update(rows.numel())
            if share is not None:  # the gated-out samples are done with this stage too
                state.stage_done[k] |= state.clean_correct & (state.broken_by < 0)
            # samples broken by an earlier stage count as done for this one
            state.stage_done[k] |= (
                state.clean_correct & (state.broken_by >= 0) & (state.broken_by < k)
            )
            progress.update(skipped)
    save(force=True)
    return state


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


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
    """Merge the shards' states on rank 0 (None on the other ranks); the shards' adversarial
    examples are copied into one file of rank 0's."""
    if group.world == 1:
        return state
    part = state.to_dict()
    broken = (state.adv_slot >= 0).nonzero().view(-1)
    part["_adv_at"] = broken
    part["_adv"] = state.x_adv(broken)
    parts = group.gather(part)
    if parts is None:
        return None
    shards = [
        (blob.pop("_adv_at"), blob.pop("_adv"), CascadeState.from_dict(blob)) for blob in parts
    ]
    merged = CascadeState.empty(n, state.stages)
    merged.clean_done = True
    merged.seconds = torch.zeros_like(shards[0][2].seconds)
    merged.store = AdvStore(None, shape=state.store.shape, dtype=state.store.dtype)  # type: ignore[union-attr]
    for r, (at, adv, st) in enumerate(shards):
        rows = Group(r, group.world).shard(n)
        for name, axis in _SAMPLE_AXIS.items():
            getattr(merged, name).index_copy_(axis, rows, getattr(st, name))
        if at.numel():
            merged.adv_slot[rows[at]] = merged.store.append(adv)
        merged.gate = st.gate  # the same on every shard (computed from all of their margins)
        merged.seconds = torch.maximum(merged.seconds, st.seconds)  # wall time: the slowest shard
    merged.adv_count = merged.store.count
    return merged
