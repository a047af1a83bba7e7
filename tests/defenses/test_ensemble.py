"""Ensembles: mean of probabilities, majority vote, disagreement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advx
from advx.defenses import Ensemble
from advx.errors import AccessError, InputError

from ..conftest import CountingNet


class Fixed(nn.Module):
    """Returns the same logits for every input (plus a tiny input-dependent term for gradients)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("z", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.z.expand(x.shape[0], -1) + 1e-3 * x.flatten(1)[:, : self.z.numel()]


def test_mean_is_the_log_of_the_mean_probability(trained_mlp, batch):
    x, _ = batch
    torch.manual_seed(1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    ens = Ensemble([advx.Classifier(trained_mlp), advx.Classifier(other)])
    with torch.no_grad():
        expect = (F.softmax(trained_mlp(x), 1) + F.softmax(other(x), 1)) / 2
        out = ens(x)
    assert torch.allclose(out.exp(), expect, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(len(x)), atol=1e-5)
    assert ens.access == "gradients" and ens.num_classes == 10


def test_vote_takes_the_majority_and_breaks_ties_by_mean_probability():
    x = torch.zeros(1, 1, 2, 2)
    a = advx.Classifier(Fixed([2.0, 0.0, 0.0]))
    b = advx.Classifier(Fixed([0.0, 3.0, 0.0]))
    c = advx.Classifier(Fixed([0.0, 1.0, 0.9]))
    assert int(Ensemble([a, b, c], combine="vote").predict(x)) == 1  # two votes for class 1
    assert int(Ensemble([a, a, b], combine="vote").predict(x)) == 0  # majority beats b's confidence
    # a and b tie at one vote each; b is the more confident: its class wins
    assert int(Ensemble([a, b], combine="vote").predict(x)) == 1
    scores = Ensemble([a, b, c], combine="vote")(x)[0]
    assert scores[1] > 2 / 3 - 1e-6 and scores[0] < 1 / 3 + 0.5 / 3 and scores[2] < 0.5 / 3
    # the mean of probabilities may disagree with the vote: a's confidence outweighs b and c
    a_sure = advx.Classifier(Fixed([9.0, 0.0, 0.0]))
    assert int(Ensemble([a_sure, c, c], combine="vote").predict(x)) == 1
    assert int(Ensemble([a_sure, c, c], combine="mean").predict(x)) == 0


def test_a_vote_gives_no_gradients(clf, batch):
    x, y = batch
    ens = Ensemble([clf, clf], combine="vote")
    assert ens.access == "scores"
    with pytest.raises(AccessError):
        advx.PGD(advx.Linf(0.1), steps=2)(ens, x, y)


def test_disagreement_is_zero_for_identical_members_and_grows_with_dissent(clf, batch, trained_mlp):
    x, _ = batch
    assert float(Ensemble([clf, clf, clf]).disagreement(x).abs().max()) < 1e-6
    torch.manual_seed(2)
    other = advx.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    d = Ensemble([clf, other]).disagreement(x)
    assert d.shape == (len(x),) and bool((d > 0).all()) and bool((d <= 0.5 + 1e-6).all())
    # members certain of different classes: the maximum, 1 - 1/M
    certain = [advx.Classifier(Fixed([0.0] * k + [50.0] + [0.0] * (2 - k))) for k in range(3)]
    assert float(Ensemble(certain).disagreement(torch.zeros(1, 1, 2, 2))) == pytest.approx(
        1 - 1 / 3, abs=1e-4
    )


def test_pgd_attacks_the_mean_through_every_member(trained_mlp, batch):
    x, y = batch
    a, b = CountingNet(trained_mlp), CountingNet(trained_mlp)
    ens = Ensemble([advx.Classifier(a), advx.Classifier(b)])
    r = advx.PGD(advx.Linf(0.2), steps=10)(ens, x, y)
    assert r.success.float().mean() > 0.8
    # one query of the ensemble queries each member once
    assert a.forward_rows == b.forward_rows == int(r.queries.sum())
    assert a.backward_rows == b.backward_rows == int(r.grads.sum())


def test_bad_ensembles_are_refused(clf, trained_mlp):
    with pytest.raises(InputError, match="list"):
        Ensemble(clf)
    with pytest.raises(InputError, match="combine"):
        Ensemble([clf], combine="median")
    with pytest.raises(InputError, match="bounds"):
        Ensemble([clf, advx.Classifier(trained_mlp, bounds=(0.0, 255.0))])
    with pytest.raises(InputError, match="scores"):
        Ensemble([clf, clf.as_blackbox("labels")])
    with pytest.raises(InputError, match="classes"):
        Ensemble([clf, advx.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 3)))])(
            torch.rand(2, 1, 28, 28)
        )


def test_log_mean_is_stable_for_confident_members():
    x = torch.zeros(2, 1, 2, 2)
    ens = Ensemble([advx.Classifier(Fixed([200.0, 0.0])), advx.Classifier(Fixed([0.0, 200.0]))])
    out = ens(x)
    assert bool(torch.isfinite(out).all())
    assert torch.allclose(out, torch.full_like(out, math.log(0.5)), atol=1e-3)
