"""The best point per sample: the two rules, the rows, the rounds, and no host sync."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from advx.attacks._best import Best


def _points(*values: float) -> torch.Tensor:
    """One (1, 2, 2) point per value, filled with it: (R, 1, 2, 2)."""
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()


def test_highest_keeps_the_first_adversarial_point_else_the_highest_loss():
    best = Best.highest(torch.zeros(3, 1, 2, 2))
    rows = torch.arange(3)
    no = torch.zeros(3, dtype=torch.bool)
    best.offer(rows, _points(1, 1, 1), torch.tensor([1.0, 1.0, 1.0]), no)
    taken = best.offer(
        rows, _points(2, 2, 2), torch.tensor([0.5, 2.0, 3.0]), torch.tensor([False, False, True])
    )
    assert taken.tolist() == [False, True, True]
    # an adversarial point is kept even with a lower loss; then nothing replaces it
    taken = best.offer(
        rows, _points(3, 3, 3), torch.tensor([0.1, 9.0, 9.0]), torch.tensor([True, False, True])
    )
    assert taken.tolist() == [True, True, False]
    assert best.x[:, 0, 0, 0].tolist() == [3.0, 3.0, 2.0]
    assert best.score.tolist() == [pytest.approx(0.1), 9.0, 3.0]
    assert best.found.tolist() == [True, False, True]
    assert best.success.tolist() == [True, False, True]
    assert best.done().tolist() == [True, False, True]


def test_a_tie_keeps_the_earlier_point():
    best = Best.highest(torch.zeros(1, 1, 2, 2))
    no = torch.zeros(1, dtype=torch.bool)
    best.offer(None, _points(1), torch.tensor([1.0]), no)
    assert not bool(best.offer(None, _points(2), torch.tensor([1.0]), no).any())
    assert float(best.x.max()) == 1.0


def test_without_a_loss_only_adversarial_points_are_taken():
    best = Best.highest(torch.zeros(2, 1, 2, 2))
    best.offer(torch.tensor([1, 0]), _points(5, 6), None, torch.tensor([True, False]))
    assert best.x[:, 0, 0, 0].tolist() == [0.0, 5.0]
    assert best.found.tolist() == [False, True]
    assert best.score.tolist() == [-math.inf, -math.inf]


def test_offer_touches_only_its_rows():
    x0 = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    best = Best.highest(x0)
    best.offer(torch.tensor([2, 0]), _points(7, 8), torch.tensor([1.0, 1.0]))
    assert best.x[:, 0, 0, 0].tolist() == [8.0, 1.0, 7.0, 3.0]
    assert best.score.tolist() == [1.0, -math.inf, 1.0, -math.inf]
    assert torch.equal(x0[:, 0, 0, 0], torch.arange(4.0)), "the start points are copied"


def test_closest_keeps_the_nearest_adversarial_point_and_knows_when_it_is_done():
    eps = torch.tensor([0.5, math.inf, 0.5])
    best = Best.closest(torch.zeros(3, 1, 2, 2), eps)
    rows = torch.arange(3)
    best.offer(
        rows, _points(1, 1, 1), torch.tensor([1.0, 1.0, 1.0]), torch.ones(3, dtype=torch.bool)
    )
    # closer but not adversarial: ignored; closer and adversarial: taken
    taken = best.offer(
        rows, _points(2, 2, 2), torch.tensor([0.2, 0.2, 2.0]), torch.tensor([False, True, True])
    )
    assert taken.tolist() == [False, True, False]
    assert best.score.tolist() == [1.0, pytest.approx(0.2), 1.0]
    best.offer(torch.tensor([2]), _points(3), torch.tensor([0.4]))  # adv None: adversarial
    assert best.x[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    # done: a success inside a finite eps; never with eps inf
    assert best.done().tolist() == [False, False, True]
    assert best.done(torch.tensor([2, 1])).tolist() == [True, False]
    assert best.success.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="distances"):
        best.offer(rows, _points(0, 0, 0))


def test_rounds_run_on_the_samples_not_done_and_stop_when_none_is_left():
    best = Best.highest(torch.zeros(4, 1, 2, 2))
    seen: list[tuple[int, list[int]]] = []

    def run(rows: torch.Tensor, r: int) -> None:
        seen.append((r, rows.tolist()))
        # round r breaks the sample of index r
        adv = rows == r
        best.offer(rows, _points(*[r + 1.0] * len(rows)), torch.zeros(len(rows)), adv)

    best.rounds(10, run)
    assert seen == [(0, [0, 1, 2, 3]), (1, [1, 2, 3]), (2, [2, 3]), (3, [3])]

    skip = torch.tensor([False, True, False, False])
    calls: list[list[int]] = []
    Best.highest(torch.zeros(4, 1)).rounds(
        2, lambda rows, r: calls.append(rows.tolist()), skip=skip
    )
    assert calls == [[0, 2, 3], [0, 2, 3]]
    calls.clear()
    done = Best.highest(torch.zeros(2, 1))
    done.found[:] = True
    done.rounds(2, lambda rows, r: calls.append(rows.tolist()), everyone=True)
    assert calls == [[0, 1], [0, 1]]


class _Ops(TorchDispatchMode):
    """Records the aten ops run inside, and whether any indexes with a boolean mask."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.mask_indexing = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops.append(name)
        if name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype == torch.bool for t in indices):
                self.mask_indexing = True
        return func(*args, **(kwargs or {}))


# what reads a device value back to the host (or needs to, to size its result)
_SYNCS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal"}


@pytest.mark.parametrize("mode", ["highest", "closest", "highest-no-loss"])
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "all"])
def test_offer_and_done_read_nothing_back_to_the_host(mode, rows):
    n = 6
    best = (
        Best.closest(torch.zeros(n, 3), torch.full((n,), 0.5))
        if mode == "closest"
        else Best.highest(torch.zeros(n, 3))
    )
    idx = torch.tensor([4, 1, 3]) if rows else None
    m = 3 if rows else n
    score = None if mode == "highest-no-loss" else torch.rand(m)
    adv = torch.rand(m) > 0.5
    with _Ops() as ops:
        best.offer(idx, torch.rand(m, 3), score, adv)
        best.done(idx)
        best.done()
        _ = best.success
    assert ops.ops, "the mode saw no op"
    assert not _SYNCS & set(ops.ops), f"host syncs: {sorted(_SYNCS & set(ops.ops))}"
    assert not ops.mask_indexing, "boolean-mask indexing sizes its result on the host"


def test_the_sync_check_sees_a_masked_write():
    """The check above fails the way the old per-attack code wrote bests."""
    best_x, x = torch.zeros(4, 3), torch.rand(4, 3)
    better = torch.rand(4) > 0.5
    with _Ops() as ops:
        best_x[better] = x[better]
    assert ops.mask_indexing or _SYNCS & set(ops.ops)


def test_a_run_kept_by_update_and_handed_over_once_equals_offering_every_step():
    """Best.update on the running rows, flushed by offer, leaves the caller's tracker exactly as
    offering every candidate would (ties and a prior score from an earlier run included)."""
    g = torch.Generator().manual_seed(0)
    n, steps = 64, 12
    x0 = torch.rand(n, 3, generator=g)
    rows = torch.randperm(2 * n, generator=g)[:n]  # positions in a larger problem
    each, once = Best.highest(torch.zeros(2 * n, 3)), Best.highest(torch.zeros(2 * n, 3))
    prior = torch.randint(-3, 3, (2 * n,), generator=g).float()  # an earlier run's losses
    for b in (each, once):
        b.offer(None, torch.zeros(2 * n, 3), prior, torch.zeros(2 * n, dtype=torch.bool))
    run = Best.highest(x0)
    for _ in range(steps):
        x = torch.rand(n, 3, generator=g)
        loss = torch.randint(-4, 5, (n,), generator=g).float()  # ties on purpose
        adv = torch.rand(n, generator=g) < 0.05
        each.offer(rows, x, loss, adv)
        run.update(x, loss, adv)
    once.offer(rows, run.x, run.score, run.found)
    assert torch.equal(each.x, once.x)
    assert torch.equal(each.score, once.score)
    assert torch.equal(each.found, once.found)
    part = run.select(torch.tensor([5, 1]))
    assert torch.equal(part.x, run.x[[5, 1]]) and torch.equal(part.found, run.found[[5, 1]])
