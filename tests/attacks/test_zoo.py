"""ZOO: gradient-free, exact per-sample accounting, and an optimizer that really optimizes."""

from __future__ import annotations

import math

import pytest
import torch

import advx
from advx.attacks import ZOO, random_targets
from advx.errors import InputError
from advx.models import Classifier

from ..conftest import CountingNet
from .test_analytic import _linear_problem

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")
INF = advx.L2(math.inf)


def _box(net, budget=None):
    """A score-only view of ``net`` that counts its rows (a fixed chunk size: no uncounted
    tuning passes)."""
    counter = CountingNet(net)
    return counter, Classifier(counter, batch_size=1 << 16).as_blackbox("scores", budget=budget)


def test_never_asks_for_a_gradient(trained_mlp, batch):
    x, y = batch
    counter, box = _box(trained_mlp)
    r = ZOO(INF, max_queries=600)(box, x[:8], y[:8])
    assert int(r.grads.sum()) == 0 and counter.backward_rows == 0
    with pytest.raises(advx.errors.AccessError):
        ZOO(INF)(Classifier(trained_mlp).as_blackbox("labels"), x[:2], y[:2])


@pytest.mark.parametrize("eps", [math.inf, 1.0])
def test_counts_every_query_and_stays_within_the_budget(trained_mlp, batch, eps):
    x, y = batch
    counter, box = _box(trained_mlp)
    r = ZOO(advx.L2(eps), max_queries=700)(box, x[:12], y[:12])
    assert int(r.queries.sum()) == counter.forward_rows
    assert bool((r.queries <= 700).all())
    # a minimum-norm run spends its budget: 2 * coordinates per iteration, and the last
    # iteration that fits (the first resolution, 8x8 = 64 coordinates: 128 queries per step)
    if math.isinf(eps):
        assert bool((r.queries > 700 - 2 * 128).all())


def test_a_hard_budget_of_the_model_is_respected(trained_mlp, batch):
    x, y = batch
    counter, box = _box(trained_mlp, budget=300)
    r = ZOO(INF, max_queries=10_000)(box, x[:6], y[:6])  # no BudgetExceeded
    assert bool((r.queries <= 300).all()) and int(r.queries.sum()) == counter.forward_rows


def test_success_and_distance_improve_with_the_budget(trained_mlp, batch):
    x, y = batch
    x, y = x[:16], y[:16]
    box = Classifier(trained_mlp).as_blackbox("scores")
    runs = [ZOO(INF, max_queries=q)(box, x, y) for q in (300, 1000, 3000)]
    rates = [r.success_rate for r in runs]
    assert rates[0] < rates[1] and rates[1] >= 0.9 and rates[2] >= 0.95
    med = [float(r.distance[r.success].median()) for r in runs[1:]]
    assert med[1] < med[0]


def test_dimension_reduction_is_what_makes_2000_queries_enough(trained_mlp, batch):
    x, y = batch
    box = Classifier(trained_mlp).as_blackbox("scores")
    reduced = ZOO(INF, max_queries=2000)(box, x, y)
    assert reduced.success_rate >= 0.9
    with torch.no_grad():
        assert bool(
            (trained_mlp(reduced.x_adv[reduced.success]).argmax(1) != y[reduced.success]).all()
        )
    # at half the budget, optimizing all 784 pixels is still far behind the 8x8 attack space
    reduced = ZOO(INF, max_queries=1000)(box, x, y)
    full = ZOO(INF, max_queries=1000, resize=None)(box, x, y)
    assert reduced.success_rate >= full.success_rate + 0.5


def test_targeted_reaches_the_target(trained_mlp, batch):
    x, y = batch
    x, y = x[:16], y[:16]
    target = random_targets(y, 10, seed=1)
    r = ZOO(INF, max_queries=3000)(
        Classifier(trained_mlp).as_blackbox("scores"), x, y, target=target
    )
    assert r.success_rate >= 0.8
    with torch.no_grad():
        pred = trained_mlp(r.x_adv[r.success]).argmax(1)
    assert torch.equal(pred, target[r.success])


def test_a_finite_ball_stops_early_and_keeps_successes_inside(trained_mlp, batch):
    x, y = batch
    box = Classifier(trained_mlp).as_blackbox("scores")
    small = ZOO(advx.L2(1.0), max_queries=2000)(box, x, y)
    assert bool((small.distance[small.success] <= 1.0 + 1e-5).all())
    assert 0 < small.success_rate < 1
    big = ZOO(advx.L2(4.0), max_queries=2000)(box, x, y)
    unbounded = ZOO(INF, max_queries=2000)(box, x, y)
    both = big.success & unbounded.success
    # a sample stops at its first success inside the ball; the minimum-norm run goes on
    assert float(big.queries[both].float().mean()) < 0.5 * float(
        unbounded.queries[both].float().mean()
    )


def test_finds_the_minimal_l2_on_a_linear_model():
    """Two classes split by a hyperplane: the smallest L2 perturbation is the distance to the
    plane, known exactly. Finite differences + coordinate Adam + the search on c find it."""
    net, x, y, w = _linear_problem(d=40, n=16, dtype=torch.float32)
    net = net.float()
    optimum = (x @ w + net.b.detach()).abs() / w.norm()
    r = ZOO(INF, max_queries=4000, lr=0.01)(Classifier(net).as_blackbox("scores"), x, y)
    assert bool(r.success.all())
    ratio = r.distance / optimum
    assert float(ratio.median()) < 1.06 and float(ratio.max()) < 1.3


def test_importance_weights_follow_the_perturbation():
    attack = ZOO(INF)
    delta = torch.zeros(2, 1, 16, 16)
    delta[0, 0, :4, :4] = 1.0  # one corner region moved
    w = attack._weights(delta, level=1).view(2, 16, 16)
    assert float(w[0, :2, :2].mean()) > 5 * float(w[0, 8:, 8:].mean())
    assert torch.allclose(w[1], w[1].mean().expand(16, 16))  # nothing moved: uniform
    assert torch.equal(attack._weights(delta, level=0), torch.ones(2, 256))  # first level: uniform


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_queries=0),
        dict(lr=0.0),
        dict(coordinates=-1),
        dict(resize=0),
        dict(c=-1.0),
        dict(importance_sampling="yes"),
    ],
)
def test_rejects_bad_settings(bad):
    with pytest.raises(InputError):
        ZOO(INF, **bad)
