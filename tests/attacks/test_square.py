"""Square Attack: scores only, exact per-sample query accounting, the paper's updates.

The structural tests log every query a black box receives and replay the random search: each
Linf candidate must differ from the current point (the last accepted candidate) inside one
square of the scheduled side only, and be accepted exactly when it raises the attacker's loss;
each L2 candidate must have norm eps and change only the two windows of Algorithm 3.
"""

from __future__ import annotations

import math

import pytest
import torch

import advx
from advx.attacks import Square, _lanes
from advx.attacks.square import _eta, p_schedule
from advx.errors import AccessError, InputError
from advx.models import BlackBox, Classifier

from ..conftest import CountingNet


def _counting(net, kind="scores", budget=None):
    counter = CountingNet(net)
    clf = Classifier(counter)
    model = clf.as_blackbox(kind, budget=budget) if kind != "gradients" else clf
    return counter, model


# ---- (1) scores only ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["scores", "gradients"])
def test_never_asks_for_a_gradient(trained_mlp, batch, kind, monkeypatch):
    # eager compaction: the net sees exactly the charged rows (no frozen rows riding along)
    monkeypatch.setenv(_lanes.ENV, "1")
    x, y = batch
    counter, model = _counting(trained_mlp, kind)
    r = Square(advx.Linf(0.1), queries=50)(model, x, y)
    assert int(r.grads.sum()) == 0 and counter.backward_rows == 0
    assert int(r.queries.sum()) == counter.forward_rows > 0


# ---- (2) exact accounting ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "norm,eps,restarts", [("linf", 0.08, 1), ("linf", 0.08, 3), ("l2", 1.5, 2)]
)
def test_query_accounting_is_exact(trained_mlp, batch, norm, eps, restarts):
    x, y = batch
    budget = 100
    counter, model = _counting(trained_mlp)
    r = Square(advx.ThreatModel(norm, eps), queries=budget, restarts=restarts)(model, x, y)
    assert int(r.queries.sum()) == counter.forward_rows
    # clean check + start point + candidates: never more than queries + 2 passes per sample
    assert int(r.queries.max()) <= budget + 2
    assert bool((r.queries >= 2).all())
    # a sample the search could not break spent its whole budget, no more, no less
    assert bool(r.success.any()) and not bool(r.success.all())
    assert bool((r.queries[~r.success] == budget + 2).all())


def test_a_sample_broken_by_the_start_point_costs_two_passes(trained_mlp, batch):
    x, y = batch
    r = Square(advx.Linf(0.3), queries=200)(trained_mlp, x, y)
    # stripes of +-0.3 break some digits of an undefended MLP outright
    assert int((r.queries == 2).sum()) >= 1
    assert bool(r.success[r.queries == 2].all())


def test_the_models_budget_stops_samples_without_raising(trained_mlp, batch):
    x, y = batch
    counter, model = _counting(trained_mlp, budget=30)
    r = Square(advx.Linf(0.08), queries=500)(model, x, y)
    assert int(r.queries.max()) <= 30
    assert bool((r.queries[~r.success] == 30).all()) and bool((~r.success).any())
    assert int(r.queries.sum()) == counter.forward_rows


# ---- (3) more queries, more successes ------------------------------------------------------------
def test_success_grows_with_the_budget(trained_mlp, batch):
    x, y = batch
    rates = [
        Square(advx.Linf(0.1), queries=q)(trained_mlp, x, y).success_rate for q in (10, 100, 300)
    ]
    assert rates[0] < rates[1] < rates[2], rates
    assert rates[2] >= 0.8 and rates[0] <= 0.3, rates


# ---- (4) label-only is refused -------------------------------------------------------------------
def test_label_only_black_box_is_refused_before_any_query(trained_mlp, batch):
    x, y = batch
    counter, model = _counting(trained_mlp, "labels")
    with pytest.raises(AccessError):
        Square(advx.Linf(0.1), queries=10)(model, x, y)
    assert counter.forward_rows == 0


# ---- (5) inside the threat model -----------------------------------------------------------------
def test_linf_result_is_a_vertex_of_the_ball(trained_mlp, batch):
    """Linf Square only ever moves a pixel to x - eps or x + eps (clipped): every attacked pixel
    sits at one of the two."""
    x, y = batch
    eps = 0.1
    r = Square(advx.Linf(eps), queries=100)(trained_mlp, x, y)
    assert bool(r.threat.contains(r.x_adv, x).all())
    at_vertex = (r.x_adv == (x + eps).clamp(0, 1)) | (r.x_adv == (x - eps).clamp(0, 1))
    assert bool(at_vertex.all())


def test_l2_result_is_inside_the_ball_and_uses_it(trained_mlp, batch):
    x, y = batch
    eps = 1.5
    r = Square(advx.L2(eps), queries=100)(trained_mlp, x, y)
    assert bool(r.threat.contains(r.x_adv, x).all())
    assert float(r.x_adv.min()) >= 0 and float(r.x_adv.max()) <= 1
    # clipping at the bounds eats some of the budget, but the search spends most of it
    assert float(r.distance.min()) > 0.5 * eps


def test_per_sample_eps_is_respected(trained_mlp, batch):
    x, y = batch
    eps = torch.linspace(0.0, 0.15, len(x))
    r = Square(advx.Linf(eps), queries=50)(trained_mlp, x, y)
    assert bool((r.distance <= eps + 1e-6).all())
    assert int(r.queries[0]) == 1  # eps 0: nothing to search after the clean check


# ---- the paper's pieces --------------------------------------------------------------------------
def test_p_schedule_is_the_authors_rescaled_to_the_budget():
    p = 0.8
    assert p_schedule(p, 0, 10000) == p and p_schedule(p, 10, 10000) == p
    assert p_schedule(p, 11, 10000) == p / 2 and p_schedule(p, 50, 10000) == p / 2
    assert p_schedule(p, 51, 10000) == p / 4 and p_schedule(p, 500, 10000) == p / 8
    assert p_schedule(p, 1001, 10000) == p / 32 and p_schedule(p, 5000, 10000) == p / 128
    assert p_schedule(p, 9999, 10000) == p / 512
    # 1000 iterations read the schedule at t * 10: halvings come ten times sooner
    assert p_schedule(p, 1, 1000) == p and p_schedule(p, 2, 1000) == p / 2
    assert p_schedule(p, 6, 1000) == p / 4 and p_schedule(p, 999, 1000) == p / 512
    values = [p_schedule(p, t, 5000) for t in range(5000)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("s", [1, 3, 5, 8, 25])
def test_eta_is_two_opposite_humps_of_unit_norm(s):
    eta = _eta(s)
    assert eta.shape == (s, s)
    assert math.isclose(float(eta.norm()), 1.0, rel_tol=1e-12)
    top, bottom = eta[: s // 2], eta[s // 2 :]
    assert bool((top > 0).all()) and bool((bottom < 0).all())
    if s % 2:  # odd sides (those of the L2 updates) have a centre column
        assert torch.allclose(eta, eta.flip(1))
    if s >= 5:  # each hump peaks in its centre
        b = bottom.abs()
        assert float(b[b.shape[0] // 2, s // 2]) == float(b.max())
        assert float(b[0, 0]) < float(b[b.shape[0] // 2, s // 2])


class _Logged:
    """A linear score function that records every batch it is asked about."""

    def __init__(self, d: int, seed: int = 0, classes: int = 10) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d, classes, generator=g) * 0.05
        self.b = torch.zeros(classes)
        self.b[0] = 5.0  # class 0 wins by a margin no perturbation of these budgets can close
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        return x.flatten(1) @ self.w + self.b

    def loss(self, x: torch.Tensor) -> float:
        z = self(x)
        self.calls.pop()
        return float(z[0, 1:].max() - z[0, 0])  # margin, larger is better for the attacker


def _square_side(p: float, h: int, w: int, l2: bool) -> int:
    s = int(round(math.sqrt(p * h * w)))
    if not l2:
        return max(1, min(s, min(h, w) - 1))
    s = max(s, 3)
    s += 1 - s % 2
    while s > min(h, w) - 1:
        s -= 2
    return s


def _box(changed: torch.Tensor) -> tuple[int, int]:
    """Height and width of the bounding box of the True pixels of a (C, H, W) mask."""
    any_c = changed.any(dim=0)
    rows, cols = any_c.any(dim=1).nonzero().view(-1), any_c.any(dim=0).nonzero().view(-1)
    if rows.numel() == 0:
        return 0, 0
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def test_linf_replay_windows_schedule_and_acceptance():
    """Replay the search from the logged queries: each candidate is the current point with one
    square (of the scheduled side) set to x +- eps, and it becomes current iff its loss is
    higher."""
    c, h, w, queries, eps = 2, 12, 12, 150, 0.05
    x = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2
    fn = _Logged(c * h * w)
    r = Square(advx.Linf(eps), queries=queries)(BlackBox(fn, kind="scores"), x, torch.tensor([0]))
    assert not bool(r.success[0])
    calls = [q[0] for q in fn.calls]
    assert len(calls) == queries + 2 == int(r.queries[0])
    assert torch.equal(calls[0], x[0])  # the clean check
    start = calls[1]
    # vertical stripes: one sign per channel and column
    assert bool(((start - x[0]).abs() - eps).abs().max() < 1e-6)
    sign = (start - x[0]).sign()
    assert bool((sign == sign[:, :1, :]).all())
    current, cur_loss = start, fn.loss(start[None])
    for t, cand in enumerate(calls[2:]):
        changed = cand != current
        assert bool(changed.any()), f"iteration {t} queried an unchanged point"
        s = _square_side(p_schedule(0.8, t, queries), h, w, l2=False)
        bh, bw = _box(changed)
        assert bh <= s and bw <= s, (t, s, bh, bw)
        assert bool((((cand - x[0]).abs() - eps).abs() < 1e-6).all())
        loss = fn.loss(cand[None])
        if loss > cur_loss:
            current, cur_loss = cand, loss
    assert torch.equal(r.x_adv[0], current)


def test_l2_candidates_follow_algorithm_3():
    """Every candidate has norm exactly eps (no clipping here), and differs from the current
    point only in window W1 (new values) and W2 (set back to the clean image)."""
    c, h, w, queries, eps = 3, 16, 16, 120, 1.0
    x = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.4
    fn = _Logged(c * h * w, seed=1)
    r = Square(advx.L2(eps), queries=queries)(BlackBox(fn, kind="scores"), x, torch.tensor([0]))
    assert not bool(r.success[0])
    calls = [q[0] for q in fn.calls]
    assert len(calls) == queries + 2
    start = calls[1]
    assert math.isclose(float((start - x[0]).norm()), eps, rel_tol=1e-5)
    current, cur_loss = start, fn.loss(start[None])
    sides = set()
    for t, cand in enumerate(calls[2:]):
        assert (
            float(cand.min()) > 0 and float(cand.max()) < 1
        )  # the test's premise: nothing clipped
        assert math.isclose(float((cand - x[0]).norm()), eps, rel_tol=1e-4), t
        s = _square_side(p_schedule(0.8, t, queries), h, w, l2=True)
        sides.add(s)
        changed = (cand - current).abs() > 1e-6  # the final rescaling to eps moves others by an ulp
        zeroed = cand == x[0]
        assert int(changed.any(dim=0).sum()) <= 2 * s * s
        bh, bw = _box(changed & ~zeroed)  # the new values all lie in W1
        assert bh <= s and bw <= s, (t, s, bh, bw)
        loss = fn.loss(cand[None])
        if loss > cur_loss:
            current, cur_loss = cand, loss
    assert len(sides) > 2  # the window shrank along the schedule
    assert torch.allclose(r.x_adv[0], current)


def test_targeted_margin_moves_towards_the_target(trained_mlp, batch):
    x, y = batch
    target = advx.attacks.random_targets(y, 10, seed=5)
    r = Square(advx.Linf(0.2), queries=300)(trained_mlp, x, y, target=target)
    with torch.no_grad():
        pred = trained_mlp(r.x_adv).argmax(1)
    assert torch.equal(pred[r.success], target[r.success])
    assert r.success_rate >= 0.6


def test_ce_loss_works_too(trained_mlp, batch):
    x, y = batch
    r = Square(advx.Linf(0.1), queries=300, loss="ce")(trained_mlp, x, y)
    assert r.success_rate >= 0.7


@pytest.mark.parametrize(
    "kw",
    [
        {"queries": 0},
        {"p_init": 0.0},
        {"p_init": 1.5},
        {"loss": "hinge"},
        {"restarts": 0},
        {"queries": 4, "restarts": 3},
    ],
)
def test_bad_parameters_are_refused(kw):
    with pytest.raises(InputError):
        Square(advx.Linf(0.1), **kw)


def test_l1_is_refused():
    with pytest.raises(InputError):
        Square(advx.L1(1.0))


def _reference_linf_step(x_cur, plus, minus, p_t, u):
    """The Linf step as it was written per iteration before its tables were made per block
    (issue 15): the reference the block tables must match bit for bit."""
    n, c, h, w = x_cur.shape
    s = max(1, min(int(round(math.sqrt(p_t * h * w))), min(h, w) - 1))
    top = torch.clamp((u[:, 0] * (h - s + 1)).floor().long(), max=h - s)
    left = torch.clamp((u[:, 1] * (w - s + 1)).floor().long(), max=w - s)
    hh, ww = torch.arange(h), torch.arange(w)
    in_rows = (hh >= top.view(-1, 1)) & (hh < top.view(-1, 1) + s)
    in_cols = (ww >= left.view(-1, 1)) & (ww < left.view(-1, 1) + s)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    signs = (u[:, 2:] < 0.5).view(n, 8, c)
    moves_plus = ((plus != x_cur) & mask).view(n, c, -1).any(dim=2)
    moves_minus = ((minus != x_cur) & mask).view(n, c, -1).any(dim=2)
    useful = torch.where(signs, moves_plus.unsqueeze(1), moves_minus.unsqueeze(1)).any(dim=2)
    first = useful.to(torch.int8).argmax(dim=1)
    pick = signs.gather(1, first.view(n, 1, 1).expand(n, 1, c)).view(n, c)
    pick = torch.where(useful.any(dim=1, keepdim=True), pick, ~signs[:, 0])
    return torch.where(mask, torch.where(pick.view(n, c, 1, 1), plus, minus), x_cur)


@pytest.mark.parametrize("c, h, w", [(1, 9, 11), (3, 10, 10)])
def test_linf_block_tables_match_the_per_iteration_step(c, h, w):
    """The window, the signs and the first useful try, made per block of draws, give the
    candidates of the per-iteration reference bit for bit, the every-try-wasted fallback
    included; with rows removed (tables remade for the rows left) too."""
    n, b, iterations = 12, 7, 40
    g = torch.Generator().manual_seed(c)
    draws = torch.rand(n, b, 2 + 8 * c, generator=g, dtype=torch.float64)
    draws[0, :, :2] = 1 - 2**-24  # the streams' largest uniform: the last corner
    draws[1:4, :, 2:] = 0.25  # every try +eps ...
    x = torch.rand(n, c, h, w, generator=g)
    plus, minus = (x + 0.1).clamp(0, 1), (x - 0.1).clamp(0, 1)
    x_cur = torch.where(torch.rand(n, c, h, w, generator=g) < 0.5, plus, minus)
    x_cur[1:4] = plus[1:4]  # ... and already there: every try wasted
    attack = Square(advx.Linf(0.1), queries=iterations)
    for t0, keep in ((0, torch.arange(n)), (b, torch.tensor([0, 2, 5, 11]))):
        d, xc, pl, mi = draws[keep], x_cur[keep], plus[keep], minus[keep]
        values = torch.stack([pl, mi])
        tables = attack._linf_tables(d, t0, iterations, h, w)
        for k in range(b):
            got = attack._linf_step(xc, values, pl, mi, *tables[k])
            want = _reference_linf_step(xc, pl, mi, p_schedule(0.8, t0 + k, iterations), d[:, k])
            assert torch.equal(got, want), (t0, k)
