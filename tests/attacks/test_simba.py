"""SimBA: gradient-free, exact per-sample accounting, the DCT basis, and the accept/reject rule."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advx
from advx.attacks import SimBA, random_targets
from advx.attacks.simba import dct2, dct_matrix, idct2
from advx.errors import InputError
from advx.models import Classifier

from ..conftest import CountingNet

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


def _box(net, budget=None, bounds=(0.0, 1.0)):
    """A score-only view of ``net`` that counts its rows (a fixed chunk size: no uncounted
    tuning passes)."""
    counter = CountingNet(net)
    return counter, Classifier(counter, batch_size=1 << 16, bounds=bounds).as_blackbox(
        "scores", budget=budget
    )


# ---- the DCT ---------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 33), w=st.integers(1, 33), c=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_inverse_dct_of_the_dct_is_the_identity(h, w, c, seed):
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-10)
    assert torch.allclose(dct2(idct2(x)), x, atol=1e-10)
    assert torch.allclose(dct2(x).norm(), x.norm())  # orthonormal: energy kept


def test_dct_matrix_is_the_orthonormal_dct_ii():
    n = 8
    m = dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    v = torch.arange(n, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    # X_k = s_k * sum_i v_i cos(pi (2i + 1) k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n)
    ref = torch.stack(
        [(v * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))).sum() for k in range(n)]
    )
    ref = ref * math.sqrt(2 / n)
    ref[0] /= math.sqrt(2)
    assert torch.allclose(m @ v, ref)
    assert torch.allclose(
        dct2(torch.ones(1, 1, 4, 4, dtype=torch.float64))[0, 0, 0, 0],
        torch.tensor(4.0, dtype=torch.float64),
    )


@pytest.mark.parametrize("linf", [False, True])
def test_dct_directions_are_inverse_dcts_of_unit_coefficients(linf):
    like = torch.zeros(1, 3, 6, 5, dtype=torch.float64)
    coords = torch.tensor([0, 7, 31, 89])
    mats = (dct_matrix(6, dtype=torch.float64), dct_matrix(5, dtype=torch.float64))
    q = SimBA(advx.L2(1.0), basis="dct")._directions(coords, like, linf, mats)
    unit = (
        torch.zeros(4, 90, dtype=torch.float64)
        .scatter_(1, coords.view(-1, 1), 1.0)
        .view(4, 3, 6, 5)
    )
    ref = idct2(unit)
    if linf:
        ref = ref / ref.flatten(1).abs().amax(dim=1).view(-1, 1, 1, 1)
        assert torch.allclose(q.flatten(1).abs().amax(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(q, ref)


# ---- the attack ------------------------------------------------------------------------------
@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_never_asks_for_a_gradient(trained_mlp, batch, basis):
    x, y = batch
    counter, box = _box(trained_mlp)
    r = SimBA(advx.L2(2.0), basis=basis, max_queries=300)(box, x[:8], y[:8])
    assert int(r.grads.sum()) == 0 and counter.backward_rows == 0
    with pytest.raises(advx.errors.AccessError):
        SimBA(advx.L2(2.0))(Classifier(trained_mlp).as_blackbox("labels"), x[:2], y[:2])


@pytest.mark.parametrize(
    "norm,eps,basis", [("l2", 1.5, "dct"), ("linf", 0.1, "pixel"), ("linf", 0.15, "dct")]
)
def test_counts_every_query_and_stays_within_the_budget(trained_mlp, batch, norm, eps, basis):
    x, y = batch
    counter, box = _box(trained_mlp)
    target = random_targets(y, 10, seed=2)
    r = SimBA(advx.ThreatModel(norm, eps), basis=basis, max_queries=250)(box, x, y, target=target)
    assert int(r.queries.sum()) == counter.forward_rows
    assert bool((r.queries <= 250).all())
    assert bool((r.queries[~r.success] == 250).all())  # a sample that fails spends it all
    assert bool(r.threat.contains(r.x_adv, x).all())


def test_a_hard_budget_of_the_model_is_respected(trained_mlp, batch):
    x, y = batch
    counter, box = _box(trained_mlp, budget=40)
    target = random_targets(y, 10, seed=2)
    r = SimBA(advx.L2(1.0), max_queries=10_000)(box, x, y, target=target)  # no BudgetExceeded
    assert bool((r.queries <= 40).all()) and int(r.queries.sum()) == counter.forward_rows


@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_success_grows_with_the_budget(trained_mlp, batch, basis):
    x, y = batch
    box = Classifier(trained_mlp).as_blackbox("scores")
    budgets = (15, 100, 250) if basis == "dct" else (60, 200, 600)
    rates = [
        SimBA(advx.L2(2.5), basis=basis, max_queries=q)(box, x, y).success_rate for q in budgets
    ]
    assert rates[0] + 0.1 < rates[1] < rates[2] and rates[2] >= 0.9


@pytest.mark.parametrize("norm,eps", [("l2", 2.5), ("linf", 0.2)])
def test_targeted_reaches_the_target(trained_mlp, batch, norm, eps):
    x, y = batch
    target = random_targets(y, 10, seed=5)
    r = SimBA(advx.ThreatModel(norm, eps), max_queries=300)(
        Classifier(trained_mlp).as_blackbox("scores"), x, y, target=target
    )
    assert r.success_rate >= 0.6
    with torch.no_grad():
        pred = trained_mlp(r.x_adv[r.success]).argmax(1)
    assert torch.equal(pred, target[r.success])


def test_untargeted_stops_each_sample_at_its_first_success(trained_mlp, batch):
    x, y = batch
    counter, box = _box(trained_mlp)
    r = SimBA(advx.L2(2.5), max_queries=500)(box, x, y)
    assert r.success_rate >= 0.9
    assert float(r.queries[r.success].float().mean()) < 200  # far below the budget: nobody went on
    with torch.no_grad():  # and the returned point is the first adversarial one, inside the ball
        assert bool((trained_mlp(r.x_adv[r.success]).argmax(1) != y[r.success]).all())


def test_the_perturbation_is_a_sum_of_steps_along_low_frequencies(trained_mlp, batch):
    """Without a binding ball or box, x_adv - x is a sum of +-step multiples of the chosen DCT
    basis images: its DCT is zero outside the low-frequency block and a multiple of the step
    inside; and every accepted step lowered the true class's probability."""
    x, y = batch
    x, y = x[:8], y[:8]
    _, box = _box(trained_mlp, bounds=(-100.0, 100.0))
    step, f = 0.3, 5
    r = SimBA(advx.L2(1e4), basis="dct", step=step, freq_dims=f, max_queries=400)(box, x, y)
    coef = dct2((r.x_adv - x).double()) / step
    assert (
        float(coef[:, :, f:, :].abs().max()) < 1e-4 and float(coef[:, :, :, f:].abs().max()) < 1e-4
    )
    assert torch.allclose(coef, coef.round(), atol=1e-4)
    assert bool((coef.abs().sum(dim=(1, 2, 3)) >= 1).all())
    with torch.no_grad():
        p0 = trained_mlp(x).softmax(1).gather(1, y.view(-1, 1))
        p1 = trained_mlp(r.x_adv).softmax(1).gather(1, y.view(-1, 1))
    assert bool((p1 < p0).all())


def test_strided_order_reaches_higher_frequencies(trained_mlp, batch):
    x, y = batch
    _, box = _box(trained_mlp, bounds=(-100.0, 100.0))
    target = random_targets(y, 10, seed=2)
    kw: dict[str, Any] = dict(basis="dct", step=0.3, freq_dims=4, max_queries=300)
    rand = SimBA(advx.L2(1e4), order="random", **kw)(box, x[:8], y[:8], target=target[:8])
    strided = SimBA(advx.L2(1e4), order="strided", **kw)(box, x[:8], y[:8], target=target[:8])
    high = lambda r: float(dct2(r.x_adv - x[:8])[:, :, 4:, :].abs().sum())
    assert high(rand) < 1e-3 and high(strided) > 0.1


def test_pixel_linf_moves_pixels_by_the_step_and_projects(trained_mlp, batch):
    x, y = batch
    r = SimBA(advx.Linf(0.1), basis="pixel", step=0.25, max_queries=300)(
        Classifier(trained_mlp).as_blackbox("scores"), x[:8], y[:8]
    )
    d = r.x_adv - x[:8]
    assert float(d.abs().max()) <= 0.1 + 1e-6
    # each pixel moved by a step clipped to the ball (and the box), or not at all
    moved = d.abs() > 1e-7
    at_edge = ((d.abs() - 0.1).abs() < 1e-6) | (r.x_adv == 0) | (r.x_adv == 1)
    assert bool(at_edge[moved].all()) and int(moved.sum()) > 0


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_queries=0),
        dict(step=0.0),
        dict(basis="haar"),
        dict(order="zigzag"),
        dict(freq_dims=0),
    ],
)
def test_rejects_bad_settings(bad):
    with pytest.raises(InputError):
        SimBA(advx.L2(1.0), **bad)


def test_the_dct_basis_needs_images(trained_mlp):
    x = torch.rand(4, 784)
    net = torch.nn.Sequential(torch.nn.Linear(784, 10))
    with torch.no_grad():
        y = net(x).argmax(1)
    box = Classifier(net).as_blackbox("scores")
    with pytest.raises(InputError, match="basis='pixel'"):
        SimBA(advx.L2(1.0))(box, x, y)
    assert SimBA(advx.L2(3.0), basis="pixel", max_queries=200)(box, x, y).success_rate > 0


def test_per_sample_balls_and_a_zero_ball_that_stops_without_queries(trained_mlp, batch):
    x, y = batch
    x, y = x[:4], y[:4]
    counter, box = _box(trained_mlp)
    eps = torch.tensor([0.0, 2.5, 0.0, 0.5])
    r = SimBA(advx.L2(eps), max_queries=300)(box, x, y)
    assert torch.equal(r.x_adv[eps == 0], x[eps == 0])
    assert (
        bool(r.threat.contains(r.x_adv, x).all()) and float(r.distance[3]) > 0.4
    )  # each its own ball
    assert bool((r.queries[eps == 0] <= 2).all())  # the clean check and the first score
    assert int(r.queries.sum()) == counter.forward_rows
