"""EOT: the mean over passes, its query accounting, and its strength on a randomized model."""

from __future__ import annotations

import pytest
import torch

import advx
from advx.defenses import EOT, RandomNoise
from advx.errors import BudgetExceeded, InputError

from ..conftest import CountingNet


def test_random_noise_is_random_and_eot_reduces_the_variance(clf, batch):
    x, _ = batch
    noisy = RandomNoise(clf, 0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        single = torch.stack([noisy(x) for _ in range(16)])  # (R, N, C)
        averaged = torch.stack([EOT(noisy, 16)(x) for _ in range(16)])
    assert float(single.var(dim=0).mean()) > 0
    # the mean of 16 independent passes: a sixteenth of the variance, up to sampling error
    ratio = float(averaged.var(dim=0).mean() / single.var(dim=0).mean())
    assert 1 / 32 < ratio < 1 / 8
    # same expectation: the two estimates of the mean differ by sampling error only (~0.26 sd)
    gap = (averaged.mean(0) - single.mean(0)).abs().mean()
    assert float(gap) < 0.4 * float(single.std(dim=0).mean())


def test_eot_of_a_deterministic_model_is_the_model(clf, batch):
    x, y = batch
    view = lambda m: advx.models.ModelView(m, advx.models.Tracker(len(x), x.device))
    with clf.prepared():
        a = view(clf).value_and_grad(x, advx.attacks._losses.ce, y)
        b = view(EOT(clf, 3)).value_and_grad(x, advx.attacks._losses.ce, y)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-5)


def test_every_pass_is_counted_n_per_sample_per_call(trained_mlp, batch):
    x, y = batch
    net = CountingNet(trained_mlp)
    n = 4
    model = EOT(RandomNoise(advx.Classifier(net), 0.1), n=n)
    assert model.query_cost == n
    r = advx.PGD(advx.Linf(0.1), steps=5, early_stop=False)(model, x, y)
    # the clean check, 5 gradient steps and the last step's point: 7 calls, n passes each
    assert bool((r.queries == 7 * n).all()) and bool((r.grads == 5 * n).all())
    assert net.forward_rows == int(r.queries.sum()) and net.backward_rows == int(r.grads.sum())
    assert EOT(EOT(advx.Classifier(net), 2), 3).query_cost == 6


def test_the_budget_is_spent_n_at_a_time(trained_mlp, batch):
    x, y = batch
    clf = advx.Classifier(trained_mlp, budget=20)
    model = EOT(RandomNoise(clf, 0.1), n=8)
    assert model.budget == 20
    with pytest.raises(BudgetExceeded):
        advx.PGD(advx.Linf(0.1), steps=5, early_stop=False)(model, x, y)  # 7 calls x 8 > 20


def test_pgd_with_eot_beats_pgd_without_on_a_randomized_model(clf, batch):
    x, y = batch
    noisy = RandomNoise(clf, 0.3)
    attack = advx.PGD(advx.Linf(0.1), steps=20, early_stop=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        plain = attack(noisy, x, y).x_adv
        eot = attack(EOT(noisy, 16), x, y).x_adv

        def accuracy(xa):
            """Accuracy of the randomized model, over 64 draws."""
            with torch.no_grad():
                return float(
                    torch.stack([noisy.predict(xa) == y for _ in range(64)]).float().mean()
                )

        clean, acc_plain, acc_eot = accuracy(x), accuracy(plain), accuracy(eot)
    assert clean > 0.85
    assert acc_eot < acc_plain - 0.1, (acc_plain, acc_eot)


def test_bad_arguments(clf):
    with pytest.raises(InputError, match="n must"):
        EOT(clf, 0)
    with pytest.raises(InputError, match="sigma"):
        RandomNoise(clf, -1.0)
    with pytest.raises(InputError, match="scores"):
        EOT(clf.as_blackbox("labels"), 4)
