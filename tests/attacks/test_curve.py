"""advx.robustness_curve: robust accuracy at every eps from one minimum-norm run."""

from __future__ import annotations

import math

import pytest
import torch

import advx
from advx.attacks import AttackResult
from advx.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


def _result(distance, success, eps=math.inf) -> AttackResult:
    n = len(distance)
    return AttackResult(
        x_adv=torch.zeros(n, 1),
        success=torch.tensor(success),
        distance=torch.tensor(distance),
        queries=torch.ones(n, dtype=torch.long),
        grads=torch.zeros(n, dtype=torch.long),
        name="made-up",
        params={},
        threat=advx.L2(eps),
    )


def test_counts_the_samples_broken_within_each_eps():
    # a misclassified point (0), three broken at 0.5, 1 and 2, one the attack never broke
    r = _result([0.0, 0.5, 1.0, 2.0, 0.0], [True, True, True, True, False])
    eps, acc = advx.robustness_curve(r, [0.0, 0.4, 0.5, 1.5, 3.0])
    assert eps.tolist() == [0.0, 0.4, 0.5, 1.5, 3.0]
    assert acc.tolist() == pytest.approx([0.8, 0.8, 0.6, 0.4, 0.2])


def test_finite_budget_limits_the_grid():
    r = _result([0.1, 0.0], [True, False], eps=0.3)
    assert advx.robustness_curve(r, [0.0, 0.2, 0.3])[1].tolist() == pytest.approx([1, 0.5, 0.5])
    with pytest.raises(InputError, match="beyond it is unknown.*minimum-norm"):
        advx.robustness_curve(r, [0.1, 0.5])
    # every sample broken: the distances are known, any grid is fine
    done = _result([0.1, 0.2], [True, True], eps=0.3)
    assert advx.robustness_curve(done, [1.0])[1].tolist() == [0.0]


@pytest.mark.parametrize("grid", [[], [-0.1], [float("nan")], "abc"])
def test_bad_grid(grid):
    r = _result([0.1], [True])
    with pytest.raises(InputError, match="eps_grid"):
        advx.robustness_curve(r, grid)


def test_not_a_result():
    with pytest.raises(InputError, match="AttackResult"):
        advx.robustness_curve({"distance": [0.1]}, [0.1])  # type: ignore[arg-type]


def test_one_deepfool_run_gives_the_curve_a_fixed_eps_run_agrees_with(trained_mlp, mnist_test):
    x, y = mnist_test
    x, y = x[:40], y[:40]
    with torch.no_grad():
        clean = float((trained_mlp(x).argmax(1) == y).float().mean())
    assert clean < 1.0, "test setup: some points must be misclassified already"
    r = advx.DeepFool()(trained_mlp, x, y)
    grid = torch.linspace(0, 3, 13)
    eps, acc = advx.robustness_curve(r, grid)
    assert acc[0] == pytest.approx(clean)  # at eps 0: the clean accuracy
    assert bool((acc[1:] <= acc[:-1]).all())  # never rises with eps
    assert float(acc[-1]) == 0.0  # every point breaks within L2 3 (median about 0.9)
    # at the median distance about half of the points are left: the curve is not a step
    mid = float(r.distance[r.success & (r.distance > 0)].median())
    _, at_mid = advx.robustness_curve(r, [mid])
    assert 0.2 < float(at_mid[0]) < clean
    # a fixed-eps run follows the same path: it breaks at least the points the curve counts
    # (the projection onto the ball may break a few more)
    fixed = advx.DeepFool(advx.L2(mid))(trained_mlp, x, y)
    assert fixed.robust_accuracy <= float(at_mid[0]) + 1e-9
