"""Tests that pass only if the maths is right: on a linear model the optimum is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import advx
from advx.threat import ThreatModel

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


class Binary(nn.Module):
    """Two classes with logits (0, w.x + b): class 1 when w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b), dtype=w.dtype))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b  # (N, D) -> (N,)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _linear_problem(d=40, n=24, seed=0, dist=(0.1, 0.4), dtype=torch.float64):
    """Points at known L2 distances (in ``dist``) on both sides of a hyperplane through the
    centre of the box; the box never binds at those distances."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=dtype)
    unit = w / w.norm()
    b = -0.5 * float(w.sum())  # the plane w.x + b = 0 passes through (0.5, ..., 0.5)
    x = 0.5 + 0.1 * (torch.rand(n, d, generator=g, dtype=dtype) - 0.5)
    x = x - ((x @ w + b) / w.norm()).view(-1, 1) * unit  # onto the plane
    t = dist[0] + (dist[1] - dist[0]) * torch.rand(n, generator=g, dtype=dtype)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(dtype)
    x = x + (side * t).view(-1, 1) * unit
    assert bool(((x > 0) & (x < 1)).all())
    y = (x @ w + b > 0).long()
    return Binary(w, b), x, y, w


def _optimum(threat: ThreatModel, w, x, y):
    """argmax over the ball intersected with [0, 1] of the loss: push s = w.x down for class 1
    and up for class 0, i.e. maximize <g, x'> with g = -w (y=1) or +w (y=0)."""
    g = torch.where(y.view(-1, 1) == 1, -w, w)
    eps = float(threat.eps)
    out = []
    for xi, gi in zip(x, g):
        if threat.norm == "linf":
            out.append((xi + eps * gi.sign()).clamp(0, 1))
        elif threat.norm == "l2":  # the box does not bind at these eps (checked below)
            out.append(xi + eps * gi / gi.norm())
        else:  # greedy by |g|, each coordinate up to its room in the box
            room = torch.where(gi >= 0, 1 - xi, xi)
            step, left = torch.zeros_like(xi), eps
            for j in gi.abs().argsort(descending=True):
                take = min(float(room[j]), left)
                step[j] = take * float(gi[j].sign())
                left -= take
                if left <= 0:
                    break
            out.append(xi + step)
    return torch.stack(out)


@pytest.mark.parametrize("threat", [advx.Linf(0.05), advx.L2(0.3), advx.L1(0.9)], ids=str)
def test_fgsm_is_the_exact_maximizer_on_a_linear_model(threat):
    net, x, y, w = _linear_problem()
    expected = _optimum(threat, w, x, y)
    if threat.norm == "l2":
        assert bool(((expected > 0) & (expected < 1)).all()), "test setup: the box must not bind"
    r = advx.FGSM(threat)(net, x, y)
    done = ~r.success  # successes are returned as they are; all others are the optimum
    assert torch.allclose(r.x_adv[done], expected[done], atol=1e-9)
    assert torch.allclose(r.x_adv, expected, atol=1e-9)


@pytest.mark.parametrize("threat", [advx.Linf(0.02), advx.L2(0.1), advx.L1(0.3)], ids=str)
def test_pgd_converges_to_the_maximizer_on_a_linear_model(threat):
    # points far from the boundary: no sample flips, so PGD climbs to the constrained optimum
    net, x, y, w = _linear_problem(seed=1, dist=(0.5, 0.6))
    expected = _optimum(threat, w, x, y)
    steps = 200 if threat.norm == "l1" else 60
    step = float(threat.eps) / (10 if threat.norm == "l1" else 4)
    r = advx.PGD(threat, steps=steps, step_size=step, random_start=False, early_stop=False)(
        net, x, y
    )
    assert not bool(r.success.any())
    assert torch.allclose(r.x_adv, expected, atol=1e-6), (r.x_adv - expected).abs().max()


def test_cw_min_distance_equals_the_distance_to_the_boundary():
    # CW's resolution is Adam's first step (about lr per coordinate in tanh space): the
    # distances here are well above it
    net, x, y, w = _linear_problem(d=30, n=20, seed=2)
    exact = (x @ w + net.b.detach()).abs() / w.norm()
    r = advx.CW(advx.L2(math.inf), steps=1000, search_steps=9)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact).abs() / exact
    assert float(rel.max()) < 0.01, rel.max()
    assert bool((r.distance >= exact * (1 - 1e-6)).all())  # nothing closer than the boundary


def test_cw_with_a_finite_eps_only_counts_successes_inside_the_ball():
    net, x, y, w = _linear_problem(d=30, n=20, seed=2)
    exact = (x @ w + net.b.detach()).abs() / w.norm()
    eps = float(exact.median())
    r = advx.CW(advx.L2(eps), steps=300, search_steps=6)(net, x, y)
    assert bool((r.distance <= eps + 1e-6).all())
    assert bool(r.success[exact < eps * 0.99].all())
    assert not bool(r.success[exact > eps].any())


def test_targeted_pgd_reaches_its_target(trained_mlp, batch):
    x, y = batch
    target = (y + 1) % 10
    r = advx.PGD(advx.Linf(0.3), steps=40)(trained_mlp, x, y, target=target)
    # a few (label, label + 1) pairs are out of reach of this MLP at 0.3, by any PGD
    assert r.success.float().mean() >= 0.8
    with torch.no_grad():
        assert torch.equal(trained_mlp(r.x_adv[r.success]).argmax(1), target[r.success])


def test_restarts_keep_the_best_point_per_sample(trained_mlp, batch):
    x, y = batch
    one = advx.PGD(advx.Linf(0.06), steps=5, restarts=1)(trained_mlp, x, y)
    many = advx.PGD(advx.Linf(0.06), steps=5, restarts=4)(trained_mlp, x, y)
    assert bool((many.success | ~one.success).all())  # a restart never loses a success
    assert many.success.sum() >= one.success.sum()


def test_early_stop_spends_less_and_finds_as_much(trained_mlp, batch):
    x, y = batch
    on = advx.PGD(advx.Linf(0.2), steps=20, early_stop=True)(trained_mlp, x, y)
    off = advx.PGD(advx.Linf(0.2), steps=20, early_stop=False)(trained_mlp, x, y)
    assert torch.equal(on.success, off.success)
    assert on.grads.sum() < off.grads.sum()
    assert int(off.grads.max()) == 20
