"""FAB: exact on linear models, exact projections, FAB-T's ball semantics, targets, cost."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import advx
from advx.attacks.fab import FAB, project_hyperplane

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")

DUAL = {
    "linf": lambda g: g.abs().sum(-1),
    "l2": lambda g: g.norm(dim=-1),
    "l1": lambda g: g.abs().amax(-1),
}


def _linear_multiclass(d=40, c=6, n=24, seed=0, dtype=torch.float64):
    """A linear classifier with c classes and points near the centre of the box, where the box
    never binds at the distances involved."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    b = 0.5 * torch.randn(c, generator=g, dtype=dtype) - w @ torch.full((d,), 0.5, dtype=dtype)
    net = nn.Linear(d, c).to(dtype)
    with torch.no_grad():
        net.weight.copy_(w)
        net.bias.copy_(b)
    x = 0.5 + 0.1 * (torch.rand(n, d, generator=g, dtype=dtype) - 0.5)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def _pair_distances(net, x, y, norm):
    """(N, C): distance from x to the halfspace {f_j >= f_y} (inf for j = y). Without the box,
    |f_y - f_j| / ||w_j - w_y||_dual; misclassified means inside one of these halfspaces, so the
    minimum over j is the exact minimal perturbation."""
    with torch.no_grad():
        f = net(x)
        w = net.weight
        gap = f.gather(1, y.view(-1, 1)) - f  # (N, C)
        dw = w.unsqueeze(0) - w[y].unsqueeze(1)  # (N, C, D)
        dist = gap / DUAL[norm](dw).clamp(min=1e-30)
    return dist.scatter(1, y.view(-1, 1), math.inf)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "fab-t"])
def test_min_distance_equals_the_distance_to_the_nearest_boundary(norm, targeted):
    net, x, y = _linear_multiclass()
    exact = _pair_distances(net, x, y, norm).amin(dim=1)
    assert float(exact.max()) < 0.4, "test setup: the box must not bind"
    # the linearization is exact: a few steps reach the boundary (up to eta's overshoot, ~0.5%)
    r = FAB(advx.ThreatModel(norm, math.inf), steps=5, targeted=targeted)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.min()) >= -1e-9, "closer than the nearest boundary"
    assert float(rel.max()) < 0.01, rel.max()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_is_exact_with_the_box(norm):
    g = torch.Generator().manual_seed(1)
    n, d = 64, 30
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[::4, :10] = 0  # some coordinates the hyperplane ignores
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64) * torch.where(
        torch.arange(n) % 5 == 0, 20.0, 1.0
    )
    lower, upper = -x, 1 - x
    delta = project_hyperplane(norm, w, c, lower, upper)
    assert bool(((delta >= lower - 1e-12) & (delta <= upper + 1e-12)).all())
    v = w * c.sign().view(-1, 1)
    room = torch.where(v > 0, upper, -lower) * (v != 0)
    reach = (v.abs() * room).sum(dim=1)  # the most <sign(c) w, delta> the box allows
    ok = reach >= c.abs()
    assert 0 < int(ok.sum()) < n, "test setup: both reachable and unreachable hyperplanes"
    assert torch.allclose((w * delta).sum(dim=1)[ok], c[ok], atol=1e-9)
    # unreachable: every coordinate at its bound towards the hyperplane
    assert torch.allclose(delta[~ok], (v.sign() * room)[~ok])
    # optimality against a bisection on the norm of the solution (independent of the sorting)
    a, r, need = v.abs()[ok], room[ok], c.abs()[ok].view(-1, 1)
    if norm == "l1":  # fractional knapsack: compare with any other feasible delta's L1 norm
        best = torch.zeros_like(need)
        for i in range(a.shape[0]):  # greedy by |w| written as a plain loop
            left = float(need[i])
            for j in a[i].argsort(descending=True):
                if left <= 0:
                    break
                take = min(float(a[i, j] * r[i, j]), left)
                best[i] += take / float(a[i, j])
                left -= take
        assert torch.allclose(delta[ok].abs().sum(dim=1, keepdim=True), best, rtol=1e-9)
        return
    lo, hi = torch.zeros_like(need), torch.full_like(need, 1e6)
    for _ in range(200):
        mid = (lo + hi) / 2
        move = torch.minimum(mid, r) if norm == "linf" else torch.minimum(mid * a, r)
        short = (a * move).sum(dim=1, keepdim=True) < need
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    move = torch.minimum(hi, r) if norm == "linf" else torch.minimum(hi * a, r)
    assert torch.allclose(delta[ok].abs(), move, atol=1e-9)


def test_fab_t_with_a_finite_eps_succeeds_only_inside_the_ball(trained_mlp, batch):
    x, y = batch
    kw: dict[str, Any] = dict(steps=15, targets=3, targeted=True)
    free = FAB(advx.Linf(math.inf), **kw, early_stop=False)(trained_mlp, x, y)
    assert bool(free.success.all())
    eps = float(free.distance.median())
    inside = free.distance <= eps
    # the best point outside the ball is projected onto it by the base class and re-scored
    lucky = advx.Linf(eps).project(free.x_adv, x)
    with torch.no_grad():
        lucky = trained_mlp(lucky).argmax(1) != y
    expected = inside | lucky
    assert 0 < int(expected.sum()) < len(y)
    for early in (False, True):
        r = FAB(advx.Linf(eps), **kw, early_stop=early)(trained_mlp, x, y)
        assert torch.equal(r.success, expected)
        assert bool((r.distance[r.success] <= eps + 1e-6).all())
        with torch.no_grad():
            assert bool((trained_mlp(r.x_adv[r.success]).argmax(1) != y[r.success]).all())
        # without early stop, the run is the eps = inf run: the same closest points inside the ball
        if not early:
            assert torch.allclose(r.x_adv[inside], free.x_adv[inside], atol=1e-6)


def test_early_stop_spends_fewer_passes_for_the_same_successes(trained_mlp, batch):
    x, y = batch
    kw: dict[str, Any] = dict(steps=15, targets=3, targeted=True)
    on = FAB(advx.Linf(0.1), **kw, early_stop=True)(trained_mlp, x, y)
    off = FAB(advx.Linf(0.1), **kw, early_stop=False)(trained_mlp, x, y)
    assert torch.equal(on.success, off.success)
    assert 0 < int(on.success.sum()) < len(y)
    assert int(on.grads.sum()) < 0.7 * int(off.grads.sum())
    assert int(off.grads.max()) == 3 * 15
    # a sample that is never broken runs the whole search either way
    assert torch.equal(on.grads[~on.success], off.grads[~on.success])


def test_cost_per_step_untargeted_and_fab_t(trained_mlp, batch):
    x, y = batch
    steps = 4
    un = FAB(advx.L2(math.inf), steps=steps)(trained_mlp, x, y)
    assert bool((un.grads == 9 * steps).all())  # f_j - f_y for each of the 9 other classes
    assert bool((un.queries == 1 + 10 * steps).all())  # + one forward per step, + the clean check
    t = FAB(advx.L2(math.inf), steps=steps, targeted=True, targets=4)(trained_mlp, x, y)
    assert bool((t.grads == 4 * steps).all())
    assert bool((t.queries == 2 + 2 * 4 * steps).all())  # + the clean check and the ranking


def test_targeted_towards_the_nearest_class_matches_untargeted_and_others_cost_more():
    net, x, y = _linear_multiclass(seed=3)
    pair = _pair_distances(net, x, y, "l2")
    nearest = pair.argmin(dim=1)
    threat = advx.L2(math.inf)
    un = FAB(threat, steps=10)(net, x, y)
    to_nearest = FAB(threat, steps=10)(net, x, y, target=nearest)
    assert bool(to_nearest.success.all())
    with torch.no_grad():
        assert torch.equal(net(to_nearest.x_adv).argmax(1), nearest)
    assert torch.allclose(to_nearest.distance, un.distance, rtol=0.01)
    # towards the farthest class: never closer than its halfspace, and never closer than untargeted
    farthest = pair.masked_fill(torch.isinf(pair), -1).argmax(dim=1)
    far = FAB(threat, steps=30)(net, x, y, target=farthest)
    with torch.no_grad():
        assert torch.equal(net(far.x_adv[far.success]).argmax(1), farthest[far.success])
    assert far.success.float().mean() >= 0.8
    d = far.distance[far.success]
    assert bool(
        (d >= pair.gather(1, farthest.view(-1, 1)).view(-1)[far.success] * (1 - 1e-9)).all()
    )
    assert bool((d > un.distance[far.success] * 1.05).all())


def test_fab_t_ranks_targets_by_clean_logits():
    # with targets=1, FAB-T only crosses towards the runner-up class; on a linear model whose
    # runner-up is not the nearest boundary, it reports a larger distance than untargeted FAB
    net, x, y = _linear_multiclass(seed=3)
    pair = _pair_distances(net, x, y, "l2")
    with torch.no_grad():
        second = net(x).scatter(1, y.view(-1, 1), -math.inf).argmax(1)
    threat = advx.L2(math.inf)
    one = FAB(threat, steps=10, targeted=True, targets=1)(net, x, y)
    full = FAB(threat, steps=10, targeted=True, targets=5)(net, x, y)
    un = FAB(threat, steps=10)(net, x, y)
    assert torch.allclose(full.distance, un.distance, rtol=0.01)
    assert bool((one.distance >= full.distance * (1 - 1e-9)).all())
    differs = pair.argmin(dim=1) != second
    assert bool(differs.any())
    assert bool((one.distance[differs] > full.distance[differs] * 1.01).any())


def test_restarts_never_lose_and_stay_per_sample(trained_mlp, batch):
    x, y = batch
    one = FAB(advx.L2(math.inf), steps=8, targeted=True, targets=2)(trained_mlp, x, y)
    two = FAB(advx.L2(math.inf), steps=8, targeted=True, targets=2, restarts=2)(trained_mlp, x, y)
    assert bool((two.distance <= one.distance).all())
    assert bool((two.distance < one.distance).any())


@pytest.mark.parametrize(
    "bad",
    [
        dict(steps=0),
        dict(alpha_max=1.5),
        dict(beta=1.0),
        dict(eta=0.0),
        dict(eps_init=0.0),
        dict(targets=0),
        dict(targeted=1),
    ],
)
def test_bad_hyper_parameters_are_refused(bad):
    with pytest.raises(advx.errors.InputError):
        FAB(advx.Linf(0.3), **bad)
