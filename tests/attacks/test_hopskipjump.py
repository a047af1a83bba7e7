"""HopSkipJump: label-only access, exact per-sample query accounting, convergence to the known
distance on a linear model, the query-efficiency trace, targeted runs and budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import advx
from advx.attacks import Attack, HopSkipJump, Problem, RunOutput
from advx.errors import AccessError
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
    # the tuner measures once per bucket of batch sizes (next power of two): run it now for
    # every bucket the attack's batches fall in, so that the counter sees only the attack's rows
    for rows in (128, 256, 512, 1024, 2048):
        model.classifier(torch.zeros(rows, 1, 28, 28))
    counter.reset()
    return counter, model


def test_only_labels_are_used(trained_mlp, batch):
    x, y = batch
    r = HopSkipJump(advx.L2(math.inf), max_queries=300)(labels_only(trained_mlp), x[:8], y[:8])
    assert int(r.grads.sum()) == 0
    assert bool(r.success.all())
    with torch.no_grad():
        assert bool((trained_mlp(r.x_adv).argmax(1) != y[:8]).all())


def test_a_score_based_attack_is_refused_on_a_label_only_model(trained_mlp, batch):
    @dataclass(kw_only=True, eq=False)
    class _NeedsScores(Attack):
        access = "scores"

        def _run(self, p: Problem) -> RunOutput:
            return RunOutput(p.x)

    x, y = batch
    with pytest.raises(AccessError, match="labels"):
        _NeedsScores(advx.Linf(0.1))(labels_only(trained_mlp), x, y)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_queries_are_exact_per_sample_and_within_the_budget(trained_mlp, batch, norm):
    x, y = batch
    x, y = x[:6], y[:6]
    counter, model = counted(trained_mlp)
    attack = HopSkipJump(advx.ThreatModel(norm, math.inf), max_queries=250)
    r = attack(model, x, y)
    assert int(r.queries.sum()) == counter.forward_rows
    assert bool((r.queries <= 250 + 1).all())  # max_queries, plus the clean check
    assert int(r.queries.max()) == 251  # the budget is what stops it
    # each sample alone: the same number of rows reach the net as the batch run charged it
    for i in range(len(x)):
        counter.reset()
        alone = attack(model, x[i : i + 1], y[i : i + 1], index=torch.tensor([i]))
        assert counter.forward_rows == int(r.queries[i]) == int(alone.queries[0])
        assert torch.equal(alone.x_adv[0], r.x_adv[i])


def test_the_models_hard_budget_is_respected(trained_mlp, batch):
    x, y = batch
    r = HopSkipJump(advx.L2(math.inf), max_queries=10_000)(
        labels_only(trained_mlp, budget=120), x[:4], y[:4]
    )
    assert bool((r.queries <= 120).all()) and int(r.queries.max()) == 120
    assert bool(r.success.all())


def test_more_queries_give_closer_points(trained_mlp, batch):
    x, y = batch
    x, y = x[:16], y[:16]
    small = HopSkipJump(advx.L2(math.inf), max_queries=200)(labels_only(trained_mlp), x, y)
    large = HopSkipJump(advx.L2(math.inf), max_queries=2000)(labels_only(trained_mlp), x, y)
    assert bool(small.success.all()) and bool(large.success.all())
    assert float(large.distance.median()) < 0.7 * float(small.distance.median())
    # the trace is the best distance so far: it never grows and ends at the returned point
    d = large.trace["distance"]
    assert large.trace["checkpoints"] == [100, 200, 500, 1000, 2000]
    assert d.shape == (16, 5)
    assert bool((d[:, 1:] <= d[:, :-1]).all())
    assert torch.allclose(d[:, -1], large.distance)
    # the prefix of the long run is the short run, up to its last partial iteration
    assert bool((small.distance <= d[:, 1] * (1 + 1e-6)).all())


def test_the_trace_marks_samples_that_were_not_attacked(trained_mlp, mnist_test):
    x, y = mnist_test
    with torch.no_grad():
        wrong = (trained_mlp(x[:200]).argmax(1) != y[:200]).nonzero().view(-1)
    assert wrong.numel() > 0
    xs, ys = x[:200][wrong[:1]], y[:200][wrong[:1]]
    xb, yb = torch.cat([xs, x[:3]]), torch.cat([ys, y[:3]])
    r = HopSkipJump(advx.L2(math.inf), max_queries=150)(labels_only(trained_mlp), xb, yb)
    assert bool(torch.isnan(r.trace["distance"][0]).all())  # misclassified already: not attacked
    assert int(r.queries[0]) == 1


@pytest.mark.parametrize("search", ["geometric", "grid"])
def test_l2_reaches_the_distance_to_a_hyperplane(search):
    net, x, y, w = _linear_problem(d=40, n=16, seed=2)
    exact = (x @ w + net.b.detach()).abs() / w.norm()
    r = HopSkipJump(advx.L2(math.inf), max_queries=3000, stepsize_search=search)(
        labels_only(net), x, y
    )
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.max()) < 0.05, rel.max()
    assert float(rel.min()) > -1e-6  # nothing is closer than the boundary


def test_linf_reaches_the_distance_to_a_hyperplane():
    # the box does not bind: the Linf distance to the plane w.x + b = 0 is |w.x + b| / ||w||_1
    net, x, y, w = _linear_problem(d=40, n=16, seed=2)
    exact = (x @ w + net.b.detach()).abs() / w.abs().sum()
    r = HopSkipJump(advx.Linf(math.inf), max_queries=3000)(labels_only(net), x, y)
    rel = (r.distance - exact) / exact
    assert bool(r.success.all())
    assert float(rel.max()) < 0.1, rel.max()
    assert float(rel.min()) > -1e-6


def test_targeted_runs_reach_the_target(trained_mlp, batch):
    x, y = batch
    target = (y + 1) % 10
    r = HopSkipJump(advx.L2(math.inf), max_queries=600, init="pool")(
        labels_only(trained_mlp), x, y, target=target
    )
    # the pool is the batch: a sample whose target class is in it starts there and succeeds
    assert torch.equal(r.success, (target.view(-1, 1) == y.view(1, -1)).any(dim=1))
    assert r.success.float().mean() >= 0.8
    with torch.no_grad():
        assert torch.equal(trained_mlp(r.x_adv[r.success]).argmax(1), target[r.success])
    # the walk shortens the start: the pool image of the target class was far away
    assert float(r.distance[r.success].median()) < 0.6 * float(
        (x - x.roll(1, 0)).flatten(1).norm(dim=1).median()
    )


def test_pool_start_costs_one_query_per_try_and_is_reproducible(trained_mlp, batch):
    x, y = batch
    attack = HopSkipJump(advx.L2(math.inf), max_queries=150, init="pool", seed=4)
    a = attack(labels_only(trained_mlp), x, y)
    b = attack(labels_only(trained_mlp), x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert bool(a.success.all())


def test_a_finite_eps_counts_only_points_inside_it(trained_mlp, batch):
    x, y = batch
    x, y = x[:16], y[:16]
    free = HopSkipJump(advx.L2(math.inf), max_queries=500)(labels_only(trained_mlp), x, y)
    eps = float(free.distance.median())
    r = HopSkipJump(advx.L2(eps), max_queries=500)(labels_only(trained_mlp), x, y)
    # the same walk, stopped where it enters the ball: a success costs nothing more
    assert torch.equal(r.success, free.distance <= eps)
    assert bool((r.queries[r.success] < free.queries[r.success]).all())
    assert torch.equal(r.queries[~r.success], free.queries[~r.success])
    assert torch.equal(r.x_adv[~r.success], x[~r.success])  # no rescoring pass: the budget holds


def test_samples_without_a_starting_point_fail():
    # a constant model: nothing is ever adversarial
    linear = torch.nn.Linear(4, 2)
    net = torch.nn.Sequential(torch.nn.Flatten(), linear)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([3.0, 0.0]))
    x = torch.rand(3, 4)
    r = HopSkipJump(advx.L2(math.inf), max_queries=500)(
        labels_only(net), x, torch.zeros(3, dtype=torch.long)
    )
    assert not bool(r.success.any())
    assert torch.equal(r.x_adv, x)
    assert bool((r.queries <= 101).all())  # the noise tries, then nothing to walk from


def test_parameters_are_checked():
    with pytest.raises(advx.InputError):
        HopSkipJump(advx.L2(math.inf), stepsize_search="line")
    with pytest.raises(advx.InputError):
        HopSkipJump(advx.L2(math.inf), init="zeros")
    with pytest.raises(advx.InputError):
        HopSkipJump(advx.L1(math.inf))
    with pytest.raises(advx.InputError):
        HopSkipJump(advx.L2(math.inf), max_queries=0)
