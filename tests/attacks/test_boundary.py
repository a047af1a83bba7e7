"""Boundary attack: label-only access, exact per-sample query accounting, convergence on a linear
model, the paper's step-size adaptation, targeted runs and budgets."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import advx
from advx.attacks import Boundary
from advx.attacks.boundary import _Window
from advx.models import Classifier

from ..conftest import CountingNet
from .test_analytic import _linear_problem

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


def labels_only(net, **kw):
    return Classifier(net).as_blackbox("labels", **kw)


def counted(net):
    """A label-only model over a CountingNet, warmed up (the chunk-size tuner runs passes once)."""
    counter = CountingNet(net)
    model = labels_only(counter)
    model.classifier(torch.zeros(100, 1, 28, 28))  # more than 64 rows: the tuner runs now
    counter.reset()
    return counter, model


def test_only_labels_are_used_and_queries_are_exact_per_sample(trained_mlp, batch):
    x, y = batch
    x, y = x[:6], y[:6]
    counter, model = counted(trained_mlp)
    attack = Boundary(max_queries=301, candidates=2)
    r = attack(model, x, y)
    assert int(r.grads.sum()) == 0 and counter.backward_rows == 0
    assert int(r.queries.sum()) == counter.forward_rows
    assert bool((r.queries <= 301 + 1).all())
    assert bool(r.success.all())
    for i in range(len(x)):
        counter.reset()
        alone = attack(model, x[i : i + 1], y[i : i + 1], index=torch.tensor([i]))
        assert counter.forward_rows == int(r.queries[i]) == int(alone.queries[0])
        assert torch.allclose(alone.x_adv[0], r.x_adv[i])


def test_steps_and_the_models_budget_stop_each_sample(trained_mlp, batch):
    x, y = batch
    r = Boundary(steps=20)(labels_only(trained_mlp), x[:4], y[:4])
    start = Boundary(steps=1)(labels_only(trained_mlp), x[:4], y[:4])
    # 19 more steps of one proposal each, the orthogonal one also queried at steps 5, 10, 15, 20
    assert torch.equal(r.queries - start.queries, torch.full_like(r.queries, 19 + 4))
    capped = Boundary(max_queries=10_000)(labels_only(trained_mlp, budget=90), x[:4], y[:4])
    assert bool((capped.queries <= 90).all())


def test_more_queries_give_closer_points(trained_mlp, batch):
    x, y = batch
    x, y = x[:8], y[:8]
    small = Boundary(max_queries=150)(labels_only(trained_mlp), x, y)
    large = Boundary(max_queries=1500)(labels_only(trained_mlp), x, y)
    assert bool(small.success.all()) and bool(large.success.all())
    assert float(large.distance.median()) < 0.7 * float(small.distance.median())
    d = large.trace["distance"]
    assert bool((d[:, 1:] <= d[:, :-1]).all())
    assert torch.allclose(d[:, -1], large.distance)


def test_reaches_the_distance_to_a_hyperplane():
    net, x, y, w = _linear_problem(d=40, n=12, seed=2)
    exact = (x @ w + net.b.detach()).abs() / w.norm()
    r = Boundary(max_queries=2500)(labels_only(net), x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.max()) < 0.05, rel.max()
    assert float(rel.min()) > -1e-6


def test_step_adaptation_is_what_makes_progress():
    # a step to 5% of the distance lands inside the ball the hyperplane leaves free (the start
    # is less than 19x farther than the plane), so without adaptation no proposal is ever
    # adversarial; the success rates shrink the step until the walk moves
    net, x, y, w = _linear_problem(d=40, n=8, seed=2)
    exact = (x @ w + net.b.detach()).abs() / w.norm()
    big: dict[str, Any] = {"spherical_step": 0.2, "source_step": 0.95}
    start = Boundary(steps=1, **big)(labels_only(net), x, y)
    assert bool((start.distance < 19 * exact).all())
    stuck = Boundary(steps=600, step_adaptation=1.0, **big)(labels_only(net), x, y)
    adapt = Boundary(steps=600, step_adaptation=1.5, **big)(labels_only(net), x, y)
    assert torch.equal(stuck.x_adv, start.x_adv)
    assert bool((adapt.distance < 0.9 * start.distance).all())


def test_the_adaptation_rule():
    attack = Boundary(step_adaptation=2.0)
    rows = torch.arange(3)
    sph, step = _Window(3, 20, 20, torch.device("cpu")), _Window(3, 20, 20, torch.device("cpu"))
    # orthogonal steps: sample 0 mostly adversarial (flat boundary), 1 rarely, 2 in between
    for rate, i in ((0.9, 0), (0.1, 1), (0.35, 2)):
        v = (torch.arange(20) < int(rate * 20)).view(1, -1)
        sph.push(torch.tensor([i]), v, torch.ones_like(v))
    # steps towards the input: sample 2 rarely succeeds
    v = torch.zeros(1, 20, dtype=torch.bool)
    step.push(torch.tensor([2]), v, torch.ones_like(v))
    spherical, source = torch.full((3,), 0.01), torch.full((3,), 0.01)
    attack._adapt(rows, sph, step, spherical, source)
    assert torch.allclose(spherical, torch.tensor([0.02, 0.005, 0.01]))
    assert torch.allclose(source, torch.tensor([0.02, 0.005, 0.005]))
    full, _ = sph.rate(rows)
    assert full.tolist() == [False, False, True]  # revised windows start over


def test_targeted_runs_reach_the_target(trained_mlp, batch):
    x, y = batch
    target = (y + 1) % 10
    r = Boundary(max_queries=400, init="pool")(labels_only(trained_mlp), x, y, target=target)
    # the pool is the batch: a sample whose target class is in it starts there and succeeds
    assert torch.equal(r.success, (target.view(-1, 1) == y.view(1, -1)).any(dim=1))
    assert r.success.float().mean() >= 0.8
    with torch.no_grad():
        assert torch.equal(trained_mlp(r.x_adv[r.success]).argmax(1), target[r.success])


def test_parameters_are_checked():
    for bad in (
        {"candidates": 0},
        {"steps": 0},
        {"spherical_step": 0.0},
        {"step_adaptation": 0.5},
        {"init": "zeros"},
    ):
        with pytest.raises(advx.InputError):
            Boundary(**bad)
    with pytest.raises(advx.InputError):
        Boundary(advx.Linf(math.inf))
