"""Sync-free inner loops (issue 15): done rows ride along frozen, the batch is compacted every k
iterations, and nothing a user can see changes with k.

For every k the per-sample points (bit for bit), verdicts, distances, losses and pass counts of
PGD, APGD (APGD-T), Square and FAB (FAB-T) are those of k = 1, the eager compaction the CPU
runs by default; the model sees more rows (the frozen ones) but only the running rows are
charged. Black boxes and budgets are never padded.

Identical needs a model whose rows do not depend on the rows beside them. A matrix-multiply
kernel chosen by batch size (on this CPU, below 8 rows) can change a row's last bits with the
batch it sits in, at k = 1 as much as at any k: that is what the tolerance of the invariant
harness's batch test covers. The net here computes each row on its own (the trained MLP's
weights, products summed per row), so that any difference would be the loops' doing.
"""

from __future__ import annotations

import pytest
import torch

import advx
from advx.attacks import _lanes, _side
from advx.errors import BudgetExceeded, InputError
from advx.models import Classifier

from ..conftest import CountingNet
from .conftest import assert_same_results

K = 7  # not a divisor of any step count below: compactions fall mid-run and at odd places
pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")

LINF, L2, L1 = advx.Linf(0.06), advx.L2(1.0), advx.ThreatModel("l1", 8.0)
CASES = {
    "pgd": lambda: advx.PGD(LINF, steps=20, seed=1),
    "pgd-l2-restarts": lambda: advx.PGD(L2, steps=12, restarts=2, seed=2),
    "pgd-no-early-stop": lambda: advx.PGD(LINF, steps=10, early_stop=False, seed=3),
    "apgd-ce": lambda: advx.APGD(LINF, steps=25, seed=4),
    "apgd-t": lambda: advx.APGD(LINF, loss="dlr-targeted", steps=15, targets=3, seed=5),
    "apgd-l2-restarts": lambda: advx.APGD(L2, loss="dlr", steps=15, restarts=2, seed=6),
    "apgd-l1": lambda: advx.APGD(L1, steps=25, seed=7),
    "apgd-no-early-stop": lambda: advx.APGD(LINF, steps=15, early_stop=False, seed=8),
    "square-linf": lambda: advx.Square(LINF, queries=120, seed=9),
    "square-l2-restarts": lambda: advx.Square(advx.L2(1.5), queries=120, restarts=2, seed=10),
    "square-ce": lambda: advx.Square(advx.Linf(0.1), queries=80, loss="ce", seed=11),
    "fab": lambda: advx.FAB(advx.Linf(0.1), steps=12, seed=12),
    "fab-t-restarts": lambda: advx.FAB(
        advx.Linf(0.1), steps=10, targeted=True, targets=2, restarts=2, seed=13
    ),
    "fab-l2-unbounded": lambda: advx.FAB(advx.L2(float("inf")), steps=10, seed=14),
    "fab-no-early-stop": lambda: advx.FAB(advx.Linf(0.1), steps=10, early_stop=False, seed=15),
}
# the cases whose loops stop samples early (the others never drop a row: nothing to pad)
EARLY = {name for name in CASES if "no-early-stop" not in name and "unbounded" not in name}


@pytest.fixture(scope="module")
def net(row_net):
    return row_net


def _run(net, x, y, make, every: int, monkeypatch, *, targeted: bool, box: bool = False):
    """One run at compaction period ``every``: the result, the losses ``_run`` returned, and
    the rows the net saw."""
    monkeypatch.setenv(_lanes.ENV, str(every))
    monkeypatch.setenv(_side.ENV, "1")  # runs one at a time: the net sees what k = 1 charges
    counter = CountingNet(net)
    clf = Classifier(counter)
    model = clf.as_blackbox("scores") if box else clf
    attack = make()
    losses = []
    run = type(attack)._run

    def spy(self, p):
        out = run(self, p)
        losses.append(out.loss)
        return out

    monkeypatch.setattr(type(attack), "_run", spy)
    target = advx.attacks.random_targets(y, 10, seed=1) if targeted else None
    r = attack(model, x, y, target=target)
    monkeypatch.setattr(type(attack), "_run", run)
    return r, losses, counter


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("name", list(CASES))
def test_padded_loops_give_the_eager_results(net, batch, monkeypatch, name, targeted):
    x, y = batch
    make = CASES[name]
    eager, eager_losses, seen = _run(net, x, y, make, 1, monkeypatch, targeted=targeted)
    padded, padded_losses, seen_k = _run(net, x, y, make, K, monkeypatch, targeted=targeted)
    assert_same_results(eager, padded)
    assert len(eager_losses) == len(padded_losses)
    for a, b in zip(eager_losses, padded_losses):
        assert (a is None and b is None) or torch.equal(a, b)
    # eager: the net saw exactly the charged rows
    assert seen.forward_rows == int(eager.queries.sum())
    assert seen.backward_rows == int(eager.grads.sum())
    # padded: the charges are the eager ones; the net also saw the frozen rows, uncharged
    assert seen_k.forward_rows >= int(padded.queries.sum())
    assert seen_k.backward_rows >= int(padded.grads.sum())
    broke_mid_run = 0 < int(eager.success.sum()) < len(x)
    if name in EARLY and broke_mid_run:
        assert seen_k.forward_rows > seen.forward_rows, "no row rode along: nothing was padded"
    assert bool(eager.success.any()), f"{name}: the case breaks nothing, it tests little"


@pytest.mark.parametrize("every", [2, 3, 16, 1000])
def test_any_period_gives_the_eager_results(net, batch, monkeypatch, every):
    x, y = batch
    make = CASES["apgd-ce"]
    eager, losses, _ = _run(net, x, y, make, 1, monkeypatch, targeted=False)
    padded, padded_losses, _ = _run(net, x, y, make, every, monkeypatch, targeted=False)
    assert_same_results(eager, padded)
    assert torch.equal(losses[0], padded_losses[0])


def test_a_black_box_is_never_padded(net, batch, monkeypatch):
    """Its passes are real queries: every row it is sent is charged, at any period."""
    x, y = batch
    make = CASES["square-linf"]
    eager, _, seen = _run(net, x, y, make, 1, monkeypatch, targeted=False, box=True)
    padded, _, seen_k = _run(net, x, y, make, K, monkeypatch, targeted=False, box=True)
    assert_same_results(eager, padded)
    assert seen_k.forward_rows == seen.forward_rows == int(padded.queries.sum())


def test_a_budget_raises_at_the_same_point(net, batch, monkeypatch):
    x, y = batch
    spent = []
    for every in (1, K):
        monkeypatch.setenv(_lanes.ENV, str(every))
        counter = CountingNet(net)
        with pytest.raises(BudgetExceeded) as info:
            CASES["pgd"]()(Classifier(counter, budget=9), x, y)
        # a budget is checked before each pass, row by row: never padded
        assert counter.forward_rows == int(info.value.queries.sum())
        spent.append(info.value.queries)
    assert torch.equal(spent[0], spent[1])


def test_square_stops_at_a_budget_the_same_way(net, batch, monkeypatch):
    x, y = batch
    results = []
    for every in (1, K):
        monkeypatch.setenv(_lanes.ENV, str(every))
        counter = CountingNet(net)
        r = CASES["square-linf"]()(Classifier(counter, budget=40), x, y)
        assert counter.forward_rows == int(r.queries.sum())
        assert int(r.queries.max()) == 40
        results.append(r)
    assert_same_results(*results)


def test_the_period_per_device_and_its_override(net, batch, monkeypatch):
    x, y = batch
    monkeypatch.delenv(_lanes.ENV, raising=False)
    clf = Classifier(net)
    tracker = advx.models._base.Tracker(len(x), x.device)
    view = advx.models._base.ModelView(clf, tracker)
    from advx._rng import SampleRNG
    from advx.attacks import Problem

    p = Problem(view, x, y, None, LINF.with_bounds((0.0, 1.0)), SampleRNG(0, torch.arange(32)), 10)
    assert _lanes.compact_every(p) == _lanes.COMPACT_EVERY["cpu"]
    monkeypatch.setitem(_lanes.COMPACT_EVERY, "cpu", 5)
    assert _lanes.compact_every(p) == 5
    monkeypatch.setenv(_lanes.ENV, "3")
    assert _lanes.compact_every(p) == 3
    box = advx.models._base.ModelView(clf.as_blackbox("scores"), tracker)
    assert _lanes.compact_every(Problem(box, x, y, None, p.threat, p.rng, 10)) == 1
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv(_lanes.ENV, bad)
        with pytest.raises(InputError, match=_lanes.ENV):
            _lanes.compact_every(p)
