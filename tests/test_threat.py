"""ThreatModel: projections, random starts, directions and distances, checked as properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import advx
from advx._rng import SampleRNG
from advx.errors import InputError
from advx.threat import ThreatModel, _project_l1_box, parse_threat

norms = st.sampled_from(["linf", "l2", "l1"])


def _batch(seed: int, n: int = 6, d: int = 20):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    v = 2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x + v


@settings(max_examples=60, deadline=None)
@given(norm=norms, eps=st.floats(0.0, 5.0), seed=st.integers(0, 10_000))
def test_project_lands_in_the_ball_and_the_box(norm, eps, seed):
    x, far = _batch(seed)
    t = ThreatModel(norm, eps)
    p = t.project(far, x)
    assert bool(t.contains(p, x).all())
    assert torch.allclose(t.project(p, x), p, atol=1e-9)  # idempotent


@settings(max_examples=40, deadline=None)
@given(eps=st.floats(0.01, 6.0), seed=st.integers(0, 10_000))
def test_l1_projection_is_the_exact_nearest_point(eps, seed):
    """Compare with a bisection on the soft-threshold, and check optimality against feasible
    points nearby."""
    x, far = _batch(seed)
    v = far - x
    lo, hi = -x, 1 - x
    got = _project_l1_box(v, lo, hi, torch.full((len(x),), eps, dtype=x.dtype))
    for i in range(len(x)):
        a, cap = v[i].abs(), torch.where(v[i] >= 0, hi[i], -lo[i])
        size = lambda lam, a=a, cap=cap: float(torch.minimum((a - lam).clamp(min=0), cap).sum())
        if size(0.0) <= eps:
            lam = 0.0
        else:
            left, right = 0.0, float(a.max())
            for _ in range(200):
                m = (left + right) / 2
                left, right = (m, right) if size(m) > eps else (left, m)
            lam = right
        ref = v[i].sign() * torch.minimum((a - lam).clamp(min=0), cap)
        assert torch.allclose(got[i], ref, atol=1e-9)
        # nothing feasible is nearer: random feasible points are all further from v
        t = advx.L1(eps)
        for k in range(5):
            cand = t.random_init(x[i : i + 1], SampleRNG(k, torch.tensor([i]))) - x[i : i + 1]
            assert float((cand[0] - v[i]).norm()) >= float((got[i] - v[i]).norm()) - 1e-9


def test_linf_projection_is_a_clamp():
    x, far = _batch(1)
    p = advx.Linf(0.1).project(far, x)
    expected = torch.min(torch.max(far, x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.equal(p, expected)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_random_init_is_inside_and_fills_the_ball(norm):
    x = torch.full((400, 50), 0.5, dtype=torch.float64)
    t = ThreatModel(norm, 0.2 if norm == "linf" else 0.5)
    z = t.random_init(x, SampleRNG(0, torch.arange(400)))
    d = t.distance(z, x)
    assert bool(t.contains(z, x).all())
    # uniform in a 50-dim ball: the radius concentrates near eps (P(r < 0.8 eps) = 0.8^50 for L2)
    assert float(d.min()) > 0.5 * float(t.eps)
    assert float(d.max()) <= float(t.eps) + 1e-9
    assert not torch.equal(z[0], z[1])  # each sample has its own stream


def test_per_sample_eps_is_honoured():
    x = torch.full((3, 10), 0.5)
    eps = torch.tensor([0.0, 0.1, 0.3])
    for norm in ("linf", "l2", "l1"):
        t = ThreatModel(norm, eps)
        p = t.project(x + 1.0, x)
        assert torch.allclose(t.distance(p, x), eps, atol=1e-6)  # the box leaves room for each
        assert bool(t.contains(p, x).all())


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_steepest_ascent_has_unit_norm_and_ascends(norm):
    g = torch.randn(5, 30)
    t = ThreatModel(norm, 1.0)
    d = t.steepest_ascent(g)
    assert torch.allclose(t.distance(d, torch.zeros_like(d)), torch.ones(5), atol=1e-5)
    assert bool(((d * g).sum(dim=1) > 0).all())


def test_steepest_ascent_l1_skips_coordinates_stuck_at_a_bound():
    g = torch.tensor([[5.0, 1.0, -0.5]])
    x = torch.tensor([[1.0, 0.5, 0.5]])  # coordinate 0 is at the top and pushed further up
    d = advx.L1(1.0).steepest_ascent(g, x_adv=x, l1_sparsity=0.01)
    assert d[0, 0] == 0 and d[0, 1] == 1.0


def test_distance_values():
    x = torch.zeros(1, 4)
    z = torch.tensor([[0.3, -0.4, 0.0, 0.0]])
    assert math.isclose(float(advx.Linf(1).distance(z, x)), 0.4, rel_tol=1e-6)
    assert math.isclose(float(advx.L2(1).distance(z, x)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(advx.L1(1).distance(z, x)), 0.7, rel_tol=1e-6)


def test_bad_threats_are_refused_with_a_clear_message():
    with pytest.raises(InputError, match="norm"):
        ThreatModel("l3", 0.1)
    with pytest.raises(InputError, match="eps"):
        advx.Linf(-0.1)
    with pytest.raises(InputError, match="eps"):
        advx.Linf(float("nan"))
    with pytest.raises(InputError, match="per-sample"):
        advx.Linf(torch.tensor([0.1, -1.0]))
    with pytest.raises(InputError, match="bounds"):
        advx.Linf(0.1, bounds=(1, 0))


def test_parse_threat():
    assert parse_threat("linf:0.3") == advx.Linf(0.3)
    assert parse_threat("l2:inf").unbounded
    assert math.isclose(float(parse_threat("linf:8/255").eps), 8 / 255)
    for bad in ("linf", "linf:x", "l7:0.1", "linf:1/0"):
        with pytest.raises(InputError):
            parse_threat(bad)


def test_repr_and_value_semantics():
    assert repr(advx.Linf(0.3)) == "Linf(eps=0.3)"
    assert advx.L2(0.5) == advx.L2(0.5) and advx.L2(0.5) != advx.L1(0.5)
    assert advx.Linf(0.3).to_dict() == {"norm": "linf", "eps": 0.3, "bounds": [0.0, 1.0]}
