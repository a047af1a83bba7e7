"""FMN: exact on linear models, small distances on a real model (next to DDN and PGD) in every
norm, the budget's semantics, targets, points already misclassified, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import advx
from advx.attacks.fmn import FMN
from advx.errors import InputError

from .test_fab import _linear_multiclass, _pair_distances

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


@pytest.fixture(scope="module")
def points(trained_mlp, mnist_test):
    x, y = mnist_test
    with torch.no_grad():
        ok = trained_mlp(x).argmax(1) == y
    return x[ok][:32].clone(), y[ok][:32].clone()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_reaches_the_nearest_boundary_of_a_linear_model(norm):
    net, x, y = _linear_multiclass()
    exact = _pair_distances(net, x, y, norm).amin(dim=1)
    r = FMN(advx.ThreatModel(norm, math.inf), steps=100)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.min()) >= -1e-9, "closer than the nearest boundary"
    # the gamma lattice: 3.4e-4 (L2), 1.3e-4 (Linf); L1 2.2e-3 (its steps, a fraction of the
    # radius, approach the vertex; the fixed alpha 10 before jumped onto it: 0 here, but 33%
    # farther on the TRADES SmallCNN)
    assert float(rel.median()) < (3e-3 if norm == "l1" else 1e-3)
    # L1 steps along the L2 gradient and projects: a rare sample stops at another vertex (11%)
    assert float(rel.max()) < (0.15 if norm == "l1" else 2e-3)


class _CubeRoot(torch.nn.Module):
    """Two classes with logit gap cbrt(w.x + b): the boundary is the hyperplane w.x + b = 0, but
    the linearized distance |g| / ||grad g|| is 3 times the true one, so the first success
    lands about 3 times too far out and the radius has to come back."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d, generator=g, dtype=torch.float64)
        self.b = -0.5 * float(self.w.sum()) + 0.3 * float(self.w.norm())

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        gap = z.sign() * z.abs().pow(1 / 3)
        return torch.stack([gap / 2, -gap / 2], dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_comes_back_from_a_first_success_far_outside(norm):
    net = _CubeRoot(64)
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.02 * (torch.rand(16, 64, generator=g, dtype=torch.float64) - 0.5)
    y = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        assert bool((net(x).argmax(1) == 0).all())
        z = x @ net.w + net.b
    dual = {"linf": net.w.abs().sum(), "l2": net.w.norm(), "l1": net.w.abs().max()}[norm]
    exact = z / dual
    r = FMN(advx.ThreatModel(norm, math.inf), steps=30)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.min()) >= -1e-9, "closer than the boundary"
    # measured: at most 5.4% over (L1), 0.03% (L2, Linf); with the paper's gamma (0.05
    # annealed to 0.001) and its shrink to the best distance, 30 steps end 41% over
    assert float(rel.max()) < 0.1


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_comes_back_from_far_outside_within_20_steps(norm):
    """Gamma 0.1 -> 0.02 and the steps (L2: alpha 2; Linf, L1: a fraction of the radius): back
    to the boundary from 3 times too far within 20 steps (measured 0.02% / 0.06% / 7.4% over;
    with gamma 0.05 throughout and the paper's fixed L2-normalized steps, 13% in each norm)."""
    net = _CubeRoot(64)
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.02 * (torch.rand(16, 64, generator=g, dtype=torch.float64) - 0.5)
    y = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        z = x @ net.w + net.b
    exact = z / {"linf": net.w.abs().sum(), "l2": net.w.norm(), "l1": net.w.abs().max()}[norm]
    r = FMN(advx.ThreatModel(norm, math.inf), steps=20)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.min()) >= -1e-9 and float(rel.max()) < (0.1 if norm == "l1" else 0.01)


def test_l2_as_close_as_ddn(trained_mlp, points):
    x, y = points
    r = FMN(advx.L2(math.inf), steps=50)(trained_mlp, x, y)
    ddn = advx.attacks.create("ddn", steps=50)(trained_mlp, x, y)
    assert bool(r.success.all()) and bool(ddn.success.all())
    assert float(r.distance.median()) <= 1.01 * float(ddn.distance.median())
    assert bool((r.grads == 50).all()) and bool((r.queries == 52 + 8).all())  # + line search


@pytest.mark.parametrize("norm", ["linf", "l1"])
def test_pgd_cannot_break_the_points_inside_the_distance_fmn_found(trained_mlp, points, norm):
    """A fixed-eps PGD given 90% of each sample's FMN distance breaks few of them (measured:
    2 of 32 in Linf, 3 of 32 in L1; at 95%, 4 of 32: FMN is a few percent from the best on
    some points)."""
    x, y = points
    r = FMN(advx.ThreatModel(norm, math.inf), steps=50)(trained_mlp, x, y)
    assert bool(r.success.all())
    pgd = advx.PGD(advx.ThreatModel(norm, 0.9 * r.distance), steps=50)(trained_mlp, x, y)
    assert pgd.success.float().mean() <= 0.15
    assert float(r.distance.median()) < {"linf": 0.08, "l1": 9.0}[norm]  # measured 0.057, 6.4


def test_finite_eps_counts_only_successes_inside_and_stops_early(trained_mlp, points):
    x, y = points
    eps = 0.07  # the free search's median Linf distance is about 0.057
    r = FMN(advx.Linf(eps), steps=50)(trained_mlp, x, y)
    assert bool((r.distance[r.success] <= eps + 1e-6).all())
    assert r.success.float().mean() >= 0.6
    assert float(r.grads[r.success].float().mean()) < 25
    assert bool((r.grads[~r.success] == 50).all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_reaches_the_target(trained_mlp, points, norm):
    x, y = points
    target = (y + 1) % 10
    r = FMN(advx.ThreatModel(norm, math.inf), steps=50)(trained_mlp, x, y, target=target)
    assert bool(r.success.all())
    with torch.no_grad():
        assert torch.equal(trained_mlp(r.x_adv).argmax(1), target)


def test_points_already_misclassified_get_distance_zero_and_cost_one_pass(trained_mlp, points):
    x, y = points
    wrong = y.clone()
    wrong[:4] = (y[:4] + 3) % 10
    r = FMN(advx.Linf(math.inf), steps=10)(trained_mlp, x, wrong)
    assert bool(r.success[:4].all()) and bool((r.distance[:4] == 0).all())
    assert bool((r.queries[:4] == 1).all()) and bool((r.grads[:4] == 0).all())
    assert bool((r.grads[4:] == 10).all())


def test_bad_input():
    with pytest.raises(InputError, match="steps"):
        FMN(advx.Linf(math.inf), steps=0)
    with pytest.raises(InputError, match="gamma_init"):
        FMN(advx.Linf(math.inf), gamma_init=1.0)
    with pytest.raises(InputError, match="alpha_final"):
        FMN(advx.Linf(math.inf), alpha_final=-1.0)
    with pytest.raises(InputError, match="ThreatModel"):
        FMN("linf")  # type: ignore[arg-type]


class _HeavyLinear(torch.nn.Module):
    """Two classes split by a hyperplane whose normal has 8 entries 100 times the other 776:
    the Linf distance |z| / ||w||_1 is set by the many small entries, the L2-normalized gradient
    by the few large ones."""

    def __init__(self, d: int = 784) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(d, generator=g, dtype=torch.float64)
        self.w[:8] *= 100
        self.b = 0.25 * float(self.w.abs().sum())

    def forward(self, x):
        z = (x.flatten(1) - 0.5) @ self.w + self.b
        return torch.stack([z / 2, -z / 2], dim=1)


def test_linf_steps_along_the_sign_reach_a_boundary_set_by_many_small_weights():
    net = _HeavyLinear()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.1 * (torch.rand(16, 784, generator=g, dtype=torch.float64) - 0.5)
    y = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        exact = ((x - 0.5) @ net.w + net.b) / net.w.abs().sum()
    r = FMN(advx.Linf(math.inf), steps=30)(net, x, y)
    assert bool(r.success.all())
    rel = (r.distance - exact) / exact
    assert float(rel.min()) >= -1e-9, "closer than the boundary"
    # measured: 0.4% over; with the paper's step along the L2-normalized gradient, which moves
    # the 776 small coordinates by 1/100 of the large ones, 3.7-4.5% over
    assert float(rel.max()) < 0.01


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_line_search_closes_the_gap_the_radius_lattice_leaves(norm):
    """On a linear model a constant gamma of 0.05 leaves the closest visited point 0.12% outside
    the boundary (the radius's 1 -+ gamma lattice); the final bisection along its segment takes
    it to 0.045%."""
    net, x, y = _linear_multiclass()
    exact = _pair_distances(net, x, y, norm).amin(dim=1)
    threat = advx.ThreatModel(norm, math.inf)
    gamma = {"gamma_init": 0.05, "gamma_final": 0.05}
    with_ls = FMN(threat, steps=100, **gamma)(net, x, y)
    without = FMN(threat, steps=100, line_search=0, **gamma)(net, x, y)
    rel = (with_ls.distance - exact) / exact
    assert float(rel.min()) >= -1e-9, "closer than the nearest boundary"
    assert float(rel.max()) < 6e-4
    assert float(((without.distance - exact) / exact).median()) > 1e-3
    assert bool((with_ls.queries == without.queries + 8).all())
    with pytest.raises(InputError, match="line_search"):
        FMN(threat, line_search=-1)
