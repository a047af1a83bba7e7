"""AttackResult.summary(): the points already misclassified are reported apart, not as
successes at distance 0."""

from __future__ import annotations

import pytest
import torch

import advx


@pytest.fixture(scope="module")
def mixed(mnist_test, trained_mlp):
    """30 correctly classified digits and 5 misclassified ones."""
    x, y = mnist_test
    with torch.no_grad():
        ok = trained_mlp(x).argmax(1) == y
    assert int((~ok).sum()) >= 5
    return torch.cat([x[ok][:30], x[~ok][:5]]), torch.cat([y[ok][:30], y[~ok][:5]])


def test_an_attack_that_breaks_nothing_says_so(trained_mlp, mixed):
    x, y = mixed
    r = advx.PGD(advx.Linf(1e-4), steps=2)(trained_mlp, x, y)
    s = r.summary()
    assert s["already_adversarial"] == 5 and s["attacked"] == 30 and s["broken"] == 0
    assert s["attack_success_rate"] == 0.0
    assert s["median_distance"] is None and s["median_queries"] is None  # nothing was broken
    assert s["success_rate"] == pytest.approx(5 / 35)  # still: 5 of 35 are adversarial
    assert r.already_adversarial.tolist() == [False] * 30 + [True] * 5
    assert "broke 0 of 30 attacked, 5 already adversarial" in repr(r)


def test_distances_and_queries_are_over_the_broken_points_only(trained_mlp, mixed):
    x, y = mixed
    r = advx.PGD(advx.Linf(0.1), steps=10)(trained_mlp, x, y)
    s = r.summary()
    broken = r.success.clone()
    broken[30:] = False  # the misclassified five were never attacked
    assert s["already_adversarial"] == 5 and s["broken"] == int(broken.sum()) > 0
    assert s["attack_success_rate"] == pytest.approx(int(broken.sum()) / 30)
    assert s["median_distance"] == pytest.approx(float(r.distance[broken].double().median()))
    assert s["median_distance"] > 0
    assert s["median_queries"] == pytest.approx(float(r.queries[broken].double().median()))
