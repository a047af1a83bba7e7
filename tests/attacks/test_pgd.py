"""PGD's restarts: only on the samples still unbroken, the best point kept over all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import advx

from ..conftest import CountingNet

STEPS, RESTARTS = 5, 4


@pytest.fixture(scope="module")
def runs(trained_mlp, mnist_test):
    x, y = mnist_test
    with torch.no_grad():
        ok = trained_mlp(x).argmax(1) == y
    x, y = x[ok][:32].clone(), y[ok][:32].clone()
    threat = advx.Linf(0.07)  # about three quarters of the batch breaks
    single = advx.PGD(threat, steps=STEPS, early_stop=False)(trained_mlp, x, y)
    counter = CountingNet(trained_mlp)
    restarted = advx.PGD(threat, steps=STEPS, early_stop=False, restarts=RESTARTS)(counter, x, y)
    return x, y, single, restarted, counter


def test_restarts_run_only_on_samples_not_yet_broken(runs):
    _, _, single, r, counter = runs
    first = single.success  # restart 0 is the single run: the same stream key
    assert 0 < int(first.sum()) < len(first), "test setup: some samples must survive restart 0"
    # without early stop a restart runs all its steps: one gradient per step and sample
    assert bool((r.grads[first] == STEPS).all()), "a sample broken by restart 0 was attacked again"
    assert bool((r.grads[~first] >= 2 * STEPS).all())
    assert bool((r.grads[~r.success] == STEPS * RESTARTS).all())
    ran = r.grads // STEPS  # restarts each sample went through
    assert bool((r.grads % STEPS == 0).all())
    # per restart: STEPS passes with gradient and the last point's check; and the clean check
    assert torch.equal(r.queries, 1 + ran * (STEPS + 1))
    assert int(r.queries.sum()) == counter.forward_rows
    assert int(r.grads.sum()) == counter.backward_rows


def test_restarts_keep_the_first_success_and_otherwise_the_highest_loss(runs, trained_mlp):
    _, y, single, r, _ = runs
    first = single.success
    assert bool(r.success[first].all())
    assert torch.equal(r.x_adv[first], single.x_adv[first])
    rest = ~r.success
    with torch.no_grad():
        loss_1 = F.cross_entropy(trained_mlp(single.x_adv[rest]), y[rest], reduction="none")
        loss_r = F.cross_entropy(trained_mlp(r.x_adv[rest]), y[rest], reduction="none")
    assert bool((loss_r >= loss_1 - 1e-5).all()), "a later restart's lower loss replaced the best"
    assert bool((loss_r > loss_1 + 1e-5).any()), "no restart improved on the first: test setup"
