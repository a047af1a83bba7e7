"""Bad input: every mistake gets a message that names the argument and says what to do."""

from __future__ import annotations

import pytest
import torch

import advx
from advx.errors import AccessError, InputError


@pytest.fixture()
def pgd():
    return advx.PGD(advx.Linf(0.1), steps=2)


def test_nan_and_inf(trained_mlp, batch, pgd):
    x, y = batch
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 0, 5, 5] = bad
        with pytest.raises(InputError, match="NaN or Inf"):
            pgd(trained_mlp, xb, y)


def test_outside_bounds_and_already_normalized(trained_mlp, batch, pgd):
    x, y = batch
    with pytest.raises(InputError, match="looks already normalized.*mean/std"):
        pgd(trained_mlp, (x - 0.13) / 0.3, y)
    with pytest.raises(InputError, match="0-255"):
        pgd(trained_mlp, x * 255, y)
    with pytest.raises(InputError, match=r"expected x in \[0, 1\]"):
        pgd(trained_mlp, x + 0.05, y)


def test_integer_images(trained_mlp, batch, pgd):
    x, y = batch
    with pytest.raises(InputError, match=r"x.float\(\) / 255"):
        pgd(trained_mlp, (x * 255).to(torch.uint8), y)


def test_labels(trained_mlp, batch, pgd):
    x, y = batch
    with pytest.raises(InputError, match=r"labels must lie in \[0, 9\]"):
        pgd(trained_mlp, x, y + 10)
    with pytest.raises(InputError, match="shape"):
        pgd(trained_mlp, x, y[:-1])
    with pytest.raises(InputError, match="one-hot"):
        pgd(trained_mlp, x, torch.nn.functional.one_hot(y, 10))
    with pytest.raises(InputError, match="integer"):
        pgd(trained_mlp, x, y.float() + 0.5)


def test_targets(trained_mlp, batch, pgd):
    x, y = batch
    with pytest.raises(InputError, match="equal the true label"):
        pgd(trained_mlp, x, y, target=y)
    with pytest.raises(InputError, match="target"):
        pgd(trained_mlp, x, y, target=(y + 1)[:-2])
    with pytest.raises(InputError, match=r"target: labels must lie in \[0, 9\]"):
        pgd(trained_mlp, x, y, target=torch.full_like(y, 12))


def test_threat_and_hyper_parameters_are_checked_at_construction():
    with pytest.raises(InputError, match="ThreatModel"):
        advx.PGD(0.3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="steps"):
        advx.PGD(advx.Linf(0.3), steps=0)
    with pytest.raises(InputError, match="loss"):
        advx.PGD(advx.Linf(0.3), loss="hinge")
    with pytest.raises(InputError, match="norms"):
        advx.CW(advx.Linf(0.3))
    with pytest.raises(InputError, match="infinite"):
        advx.PGD(advx.Linf(float("inf")))
    with pytest.raises(InputError, match="registered attacks"):
        advx.attacks.create("nope", advx.Linf(0.1))
    with pytest.raises(InputError, match="parameters are"):
        advx.attacks.create("pgd", advx.Linf(0.1), stepz=3)


def test_per_sample_eps_must_match_the_batch(trained_mlp, batch):
    x, y = batch
    with pytest.raises(InputError, match="per-sample"):
        advx.PGD(advx.Linf(torch.full((3,), 0.1)), steps=2)(trained_mlp, x, y)
    eps = torch.linspace(0, 0.3, len(x))
    r = advx.PGD(advx.Linf(eps), steps=10)(trained_mlp, x, y)
    assert bool((r.distance <= eps + 1e-6).all()) and not bool(r.success[0])


def test_threat_bounds_must_agree_with_the_model(trained_mlp, batch):
    x, y = batch
    with pytest.raises(InputError, match="declare the bounds once"):
        advx.PGD(advx.Linf(0.1, bounds=(0, 255)), steps=2)(trained_mlp, x, y)


def test_not_a_model(batch, pgd):
    x, y = batch
    with pytest.raises(InputError, match="model"):
        pgd("model.pt", x, y)


def test_an_attack_refuses_a_model_without_the_access_it_needs(trained_mlp, batch, pgd):
    x, y = batch

    class LabelsOnly(advx.models.Model):
        access = "labels"

        def forward(self, x):
            raise AssertionError("never asked")

        def labels(self, x):
            return trained_mlp(x).argmax(1)

    with pytest.raises(AccessError, match="needs gradients"):
        pgd(LabelsOnly(), x, y)
