"""The runs of a cascade side by side (issue 15, item 4): APGD-T's and FAB-T's targets, APGD's
restarts, in one batch, with the results and the charges of one run after another.

A CPU runs them one at a time by default; ``ADVX_RUNS_AT_ONCE`` puts them side by side here, in
groups of every size, so that what a GPU does by default is checked on this machine. The net
computes each row on its own (``row_net``): identical results are then the loops' doing.
"""

from __future__ import annotations

import pytest
import torch

import advx
from advx.attacks import _lanes, _side
from advx.errors import InputError
from advx.models import Classifier
from advx.models._base import ModelView, Tracker

from ..conftest import CountingNet
from .conftest import assert_same_results

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")

LINF = advx.Linf(0.06)
CASES = {
    "apgd-t": lambda: advx.APGD(LINF, loss="dlr-targeted", steps=15, targets=4, seed=5),
    "apgd-t-l1": lambda: advx.APGD(
        advx.ThreatModel("l1", 6.0), loss="dlr-targeted", steps=15, targets=3, seed=21
    ),
    "apgd-ce-restarts": lambda: advx.APGD(advx.L2(1.0), steps=15, restarts=3, seed=6),
    "apgd-t-restarts": lambda: advx.APGD(
        LINF, loss="dlr-targeted", steps=10, targets=2, restarts=2, seed=22
    ),
    "apgd-t-no-early-stop": lambda: advx.APGD(
        LINF, loss="dlr-targeted", steps=10, targets=3, early_stop=False, seed=23
    ),
    "fab-t": lambda: advx.FAB(advx.Linf(0.1), steps=10, targeted=True, targets=4, seed=13),
    "fab-t-l2-unbounded": lambda: advx.FAB(
        advx.L2(float("inf")), steps=8, targeted=True, targets=3, seed=24
    ),
    "fab-t-no-early-stop": lambda: advx.FAB(
        advx.Linf(0.1), steps=8, targeted=True, targets=3, early_stop=False, seed=25
    ),
}


def _run(net, x, y, make, at_once: int, monkeypatch, *, every: int = 1, budget=None):
    monkeypatch.setenv(_side.ENV, str(at_once))
    monkeypatch.setenv(_lanes.ENV, str(every))
    counter = CountingNet(net)
    counter.calls = 0

    def count(*_):
        counter.calls += 1

    counter.register_forward_hook(count)
    # one chunk per pass: the calls then count the passes
    r = make()(Classifier(counter, budget=budget, batch_size=4096), x, y)
    return r, counter


@pytest.mark.parametrize("name", list(CASES))
def test_side_by_side_gives_the_sequential_results(row_net, batch, monkeypatch, name):
    x, y = batch
    make = CASES[name]
    one, seen = _run(row_net, x, y, make, 1, monkeypatch)
    if not make().threat.unbounded:  # (minimum norm: every sample runs every target)
        assert 0 < int(one.success.sum()) < len(x), f"{name}: nothing to tell the runs apart"
    # one at a time: the net saw exactly the charged rows
    assert seen.forward_rows == int(one.queries.sum())
    assert seen.backward_rows == int(one.grads.sum())
    for at_once in (2, 9):
        wide, seen_wide = _run(row_net, x, y, make, at_once, monkeypatch)
        assert_same_results(one, wide)
        assert seen_wide.calls < seen.calls, "nothing ran side by side"
        if make().early_stop and not make().threat.unbounded:
            # the net also ran the copies the sequential cascade skips, uncharged
            assert seen_wide.forward_rows > seen.forward_rows
        assert seen_wide.backward_rows >= int(wide.grads.sum())


@pytest.mark.parametrize("name", ["apgd-t", "fab-t"])
def test_side_by_side_with_padded_loops(row_net, batch, monkeypatch, name):
    """Both GPU settings at once: runs side by side, done rows frozen until compaction."""
    x, y = batch
    one, _ = _run(row_net, x, y, CASES[name], 1, monkeypatch)
    both, _ = _run(row_net, x, y, CASES[name], 9, monkeypatch, every=7)
    assert_same_results(one, both)


def test_a_broken_sample_is_charged_only_the_runs_before(row_net, batch, monkeypatch):
    """A sample broken by target 1 is charged target 1's passes alone, as in the sequential
    cascade, although its copies ran the other targets."""
    x, y = batch
    make = CASES["apgd-t"]
    wide, _ = _run(row_net, x, y, make, 9, monkeypatch)
    first = advx.APGD(LINF, loss="dlr-targeted", steps=15, targets=1, seed=5)
    monkeypatch.setenv(_side.ENV, "1")
    alone = first(Classifier(row_net), x, y)
    hit = alone.success
    assert bool(hit.any())
    # one forward pass to rank the targets, then target 1's run
    assert torch.equal(wide.queries[hit], alone.queries[hit])
    assert torch.equal(wide.grads[hit], alone.grads[hit])
    assert bool((wide.queries[~hit] > alone.queries[~hit]).all())


def test_budgets_and_black_boxes_run_one_at_a_time(row_net, batch, monkeypatch):
    x, y = batch
    monkeypatch.setenv(_side.ENV, "9")
    clf = Classifier(row_net)
    assert _side.runs_at_once(_problem(clf, x, y), 9) == 9
    assert _side.runs_at_once(_problem(clf, x, y), 4) == 4  # never more than there are runs
    assert _side.runs_at_once(_problem(clf, x, y, budget=100), 9) == 1
    assert _side.runs_at_once(_problem(clf.as_blackbox("scores"), x, y), 9) == 1
    # a budget is checked before each pass, in the cascade's order: same spend as sequential
    a, seen_a = _run(row_net, x, y, CASES["apgd-t"], 1, monkeypatch, budget=10_000)
    b, seen_b = _run(row_net, x, y, CASES["apgd-t"], 9, monkeypatch, budget=10_000)
    assert_same_results(a, b)
    assert seen_a.forward_rows == seen_b.forward_rows == int(b.queries.sum())


def _problem(model, x, y, *, budget=None):
    view = ModelView(model, Tracker(len(x), x.device, budget=budget))
    rng = advx._rng.SampleRNG(0, torch.arange(len(x)))
    return advx.attacks.Problem(view, x, y, None, LINF.with_bounds((0.0, 1.0)), rng, 10)


def test_the_device_default_and_its_override(row_net, batch, monkeypatch):
    x, y = batch
    monkeypatch.delenv(_side.ENV, raising=False)
    p = _problem(Classifier(row_net), x, y)
    assert _side.runs_at_once(p, 9) == _side.RUNS_AT_ONCE["cpu"] == 1
    monkeypatch.setitem(_side.RUNS_AT_ONCE, "cpu", 3)
    assert _side.runs_at_once(p, 9) == 3
    monkeypatch.setenv(_side.ENV, "5")
    assert _side.runs_at_once(p, 9) == 5
    for bad in ("0", "all", "-1"):
        monkeypatch.setenv(_side.ENV, bad)
        with pytest.raises(InputError, match=_side.ENV):
            _side.runs_at_once(p, 9)
