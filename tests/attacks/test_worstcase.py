"""WorstCase: a cascade keeps each sample's first success and charges every stage's passes."""

from __future__ import annotations

import pytest
import torch

import advx
from advx.attacks import WorstCase, _lanes
from advx.errors import InputError

from ..conftest import CountingNet


def test_each_stage_runs_only_on_what_is_still_robust(trained_mlp, batch, monkeypatch):
    # compaction every step (the CPU's default, whatever the environment): the net then sees
    # exactly the rows charged
    monkeypatch.setenv(_lanes.ENV, "1")
    x, y = batch
    eps = advx.Linf(0.08)
    net = CountingNet(trained_mlp)
    cascade = WorstCase([advx.FGSM(eps), advx.PGD(eps, steps=10)])
    r = cascade(net, x, y)
    fgsm = advx.FGSM(eps)(trained_mlp, x, y)
    stage = r.trace["stage"]
    assert torch.equal(stage == 0, fgsm.success)  # FGSM is deterministic: the same first stage
    assert bool(r.success[stage >= 0].all()) and not bool(r.success[stage < 0].any())
    assert torch.equal(r.x_adv[fgsm.success], fgsm.x_adv[fgsm.success])  # the first success is kept
    assert int(r.grads[stage == 0].max()) == 1  # no PGD step for points FGSM broke
    assert net.forward_rows == int(r.queries.sum()) and net.backward_rows == int(r.grads.sum())
    assert r.success.sum() >= fgsm.success.sum()


def test_the_threat_must_be_shared():
    with pytest.raises(InputError, match="same threat model"):
        WorstCase([advx.FGSM(advx.Linf(0.1)), advx.PGD(advx.Linf(0.2))])
    with pytest.raises(InputError, match="non-empty list"):
        WorstCase([])


def test_targeted_cascade(trained_mlp, batch):
    x, y = batch
    t = (y + 3) % 10
    r = WorstCase([advx.FGSM(advx.Linf(0.2)), advx.PGD(advx.Linf(0.2), steps=20)])(
        trained_mlp, x, y, target=t
    )
    with torch.no_grad():
        assert torch.equal(trained_mlp(r.x_adv[r.success]).argmax(1), t[r.success])
    assert r.success_rate > 0.5
