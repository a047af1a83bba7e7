"""Masked and deferred charging (models/_base.py): passes over rows that ride along frozen are
not charged; a padded view's tab charges each sample its passes less its frozen ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advx.errors import InputError
from advx.models import Classifier
from advx.models._base import ModelView, Tracker

from ..conftest import CountingNet


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def test_charge_with_a_mask_charges_the_active_entries_only():
    t = Tracker(5, torch.device("cpu"))
    t.charge(torch.tensor([0, 2, 4]), backward=True, cost=3, active=torch.tensor([1, 0, 1]) > 0)
    assert t.queries.tolist() == [3, 0, 0, 0, 3]
    assert t.grads.tolist() == [3, 0, 0, 0, 3]
    t.charge(torch.tensor([1, 1]), backward=False)  # repeats still add up
    assert t.queries.tolist() == [3, 2, 0, 0, 3] and t.grads.tolist() == [3, 0, 0, 0, 3]


def test_a_padded_view_charges_running_rows_when_settled():
    counter = CountingNet(_net())
    model = Classifier(counter)
    tracker = Tracker(6, torch.device("cpu"))
    view = ModelView(model, tracker).select(torch.tensor([1, 2, 3, 5])).padded()
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    a = torch.tensor([False, True, False, False])
    b = torch.tensor([False, True, False, True])
    view.logits(x)  # nobody frozen
    view.logits(x, frozen=a)
    view.value_and_grad(x, _loss, y, frozen=b)
    view.value_and_grad(x, _loss, y, frozen=a)
    assert int(tracker.queries.sum()) == 0  # on the tab: nothing charged before it is settled
    assert counter.forward_rows == 16  # the net saw every row, frozen or not
    view.settle()
    assert tracker.queries.tolist() == [0, 4, 1, 4, 0, 3]
    assert tracker.grads.tolist() == [0, 2, 0, 2, 0, 1]
    view.settle()  # nothing more to charge
    assert tracker.queries.tolist() == [0, 4, 1, 4, 0, 3]


def test_select_and_queries_settle_the_tab_first():
    model = Classifier(_net())
    tracker = Tracker(3, torch.device("cpu"))
    view = ModelView(model, tracker).padded()
    x = torch.rand(3, 1, 2, 2)
    view.logits(x, frozen=torch.tensor([False, False, True]))
    assert view.queries.tolist() == [1, 1, 0]
    view.logits(x, frozen=torch.tensor([True, False, True]))
    sub = view.select(torch.tensor([1]))
    assert tracker.queries.tolist() == [1, 2, 0]
    assert sub.tab is not None  # still padded
    sub.logits(x[1:2])
    sub.settle()
    assert tracker.queries.tolist() == [1, 3, 0]


def test_query_cost_multiplies_the_settled_passes():
    model = Classifier(_net())
    model.query_cost = 4  # e.g. a wrapper averaging four draws per pass
    tracker = Tracker(2, torch.device("cpu"))
    view = ModelView(model, tracker).padded()
    view.logits(torch.rand(2, 1, 2, 2), frozen=torch.tensor([True, False]))
    view.settle()
    assert tracker.queries.tolist() == [0, 4]


def test_only_a_paddable_model_without_a_budget_is_padded():
    clf = Classifier(_net())
    box = clf.as_blackbox("scores")
    assert clf.paddable and not box.paddable
    with pytest.raises(InputError, match="not paddable"):
        ModelView(box, Tracker(2, torch.device("cpu"))).padded()
    with pytest.raises(InputError, match="budget"):
        ModelView(clf, Tracker(2, torch.device("cpu"), budget=10)).padded()


def test_a_padded_view_sends_one_row_per_sample():
    view = ModelView(Classifier(_net()), Tracker(2, torch.device("cpu"))).padded()
    with pytest.raises(InputError, match="one row per sample"):
        view.logits(torch.rand(3, 1, 2, 2), rows=torch.tensor([0, 0, 1]))
