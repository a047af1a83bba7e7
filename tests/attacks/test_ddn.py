"""DDN: small distances on a real model (next to FAB and PGD), the budget's semantics, targets,
points already misclassified, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import advx
from advx.attacks.ddn import DDN
from advx.errors import InputError


@pytest.fixture(scope="module")
def ddn_run(trained_mlp, mnist_test):
    x, y = mnist_test
    with torch.no_grad():
        ok = trained_mlp(x).argmax(1) == y
    x, y = x[ok][:32].clone(), y[ok][:32].clone()
    return x, y, DDN(steps=100)(trained_mlp, x, y)


def test_every_point_broken_as_close_as_fab_finds(trained_mlp, ddn_run):
    x, y, r = ddn_run
    assert bool(r.success.all())
    # 100 steps, the first check, the last point, 8 passes of the line search
    assert bool((r.grads == 100).all()) and bool((r.queries == 102 + 8).all())
    # FAB steps onto the linearized boundary exactly: a strong minimum-norm reference
    fab = advx.FAB(advx.L2(math.inf), steps=20)(trained_mlp, x, y)
    assert bool(fab.success.all())
    ratio = float(r.distance.median() / fab.distance.median())
    assert ratio < 1.02, f"DDN's median L2 is {ratio:.3f} x FAB's"
    assert float(r.distance.median()) < 1.2  # the MLP breaks at about 0.9 (measured)


def test_reaches_a_far_boundary_in_a_few_steps():
    """A 2-class linear model whose boundary lies 2.5 (L2) from every point, inside the box:
    growing by 1 + gamma a step from init_epsilon 1, the paper's radius would need 19 steps to
    get there (1.05^15 is 2.08: 15 steps never reach it); the linearized distance takes it
    there at once."""
    g = torch.Generator().manual_seed(0)
    d, n = 400, 16
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = 0.5 + 0.05 * (torch.rand(n, d, generator=g, dtype=torch.float64) - 0.5)
    net = nn.Linear(d, 2).to(torch.float64)
    with torch.no_grad():
        net.weight.copy_(torch.stack([w / 2, -w / 2]))  # f_0 - f_1 = w.x + b
        b = 2.5 * w.norm() - w @ torch.full((d,), 0.5, dtype=torch.float64)
        net.bias.copy_(torch.stack([b / 2, -b / 2]))
        gap = net(x)[:, 0] - net(x)[:, 1]
    exact = gap / w.norm()
    shift = exact.view(-1, 1) * w / w.norm()  # the way to the boundary: x - shift
    assert float(exact.min()) > 2.4 and float(shift.abs().max()) < 0.45, "setup: inside the box"
    y = torch.zeros(n, dtype=torch.long)
    r = DDN(steps=15)(net, x, y)
    assert bool(r.success.all())
    assert float(((r.distance - exact) / exact).max()) < 0.1


def test_pgd_cannot_break_the_points_inside_the_distance_ddn_found(trained_mlp, ddn_run):
    """A fixed-eps PGD given each sample's DDN distance (less 5%) as its budget breaks almost
    none of them: DDN's distances are close to the smallest a gradient attack finds."""
    x, y, r = ddn_run
    pgd = advx.PGD(advx.L2(0.95 * r.distance), steps=100)(trained_mlp, x, y)
    assert pgd.success.float().mean() <= 0.1


def test_finite_eps_counts_only_successes_inside_and_stops_early(trained_mlp, ddn_run):
    x, y, free = ddn_run
    eps = float(free.distance.median()) * 1.2
    r = DDN(advx.L2(eps), steps=100)(trained_mlp, x, y)
    assert bool((r.distance[r.success] <= eps + 1e-5).all())
    assert r.success.float().mean() >= 0.5
    # a sample stops at its first success inside the ball
    assert float(r.grads[r.success].float().mean()) < 60
    assert bool((r.grads[~r.success] == 100).all())


def test_targeted_reaches_the_target(trained_mlp, ddn_run):
    x, y, free = ddn_run
    target = (y + 1) % 10
    r = DDN(steps=100)(trained_mlp, x, y, target=target)
    assert bool(r.success.all())
    with torch.no_grad():
        assert torch.equal(trained_mlp(r.x_adv).argmax(1), target)
    # reaching one given class is harder than leaving the true one
    assert float(r.distance.median()) > float(free.distance.median())


def test_points_already_misclassified_get_distance_zero_and_cost_one_pass(trained_mlp, ddn_run):
    x, y, _ = ddn_run
    wrong = y.clone()
    wrong[:4] = (y[:4] + 3) % 10  # labels the model disagrees with: misclassified already
    r = DDN(steps=10)(trained_mlp, x, wrong)
    assert bool(r.success[:4].all()) and bool((r.distance[:4] == 0).all())
    assert bool((r.queries[:4] == 1).all()) and bool((r.grads[:4] == 0).all())
    assert bool((r.grads[4:] == 10).all())


def test_bad_input():
    with pytest.raises(InputError, match="supports the norms l2, not linf"):
        DDN(advx.Linf(0.3))
    with pytest.raises(InputError, match="gamma"):
        DDN(gamma=1.5)
    with pytest.raises(InputError, match="init_epsilon"):
        DDN(init_epsilon=0)
    with pytest.raises(InputError, match="eps"):
        DDN(advx.L2(-1.0))
    one = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(InputError, match="at least 2"):
        # a single class: the label 0 is right everywhere, there is no boundary
        DDN()(one, torch.rand(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))


def test_comes_back_from_a_first_success_far_outside_within_20_steps():
    """A boundary whose linearized distance is 3 times the true one (the logit gap is the cube
    root of a linear function): the first success lands far outside it. With alpha 2 and the
    final line search 20 steps end within 1% of it (measured 0.9% at most; alpha 1 without
    the line search: 36%)."""
    from .test_fmn import _CubeRoot

    net = _CubeRoot(64)
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.02 * (torch.rand(16, 64, generator=g, dtype=torch.float64) - 0.5)
    y = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        exact = (x @ net.w + net.b) / net.w.norm()
    r = DDN(steps=20)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.min()) >= -1e-9 and float(rel.max()) < 0.03
