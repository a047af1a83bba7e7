"""Keeping what the audit found: every adversarial example, losslessly, and loading it back
reproduces the report's per-sample verdicts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import advx
from advx.audit.adversarial import AdversarialExamples
from advx.errors import InputError

EPS = 0.05


def suite():
    return [advx.FGSM(advx.Linf(EPS)), advx.PGD(advx.Linf(EPS), steps=3)]


@pytest.fixture(scope="module")
def data(mnist_test):
    x, y = mnist_test
    return x[:60], y[:60]


@pytest.fixture(scope="module")
def report(trained_mlp, data):
    x, y = data
    return advx.audit(
        trained_mlp,
        x,
        y,
        advx.Linf(EPS),
        suite=suite(),
        eps_curve=None,
        checks=False,
        return_adv=True,
    )


def test_loading_the_file_back_reproduces_every_verdict(report, trained_mlp, data, tmp_path):
    x, y = data
    report.adversarial.save(tmp_path / "adv.npz")
    adv = AdversarialExamples.load(tmp_path / "adv.npz")
    s = report.samples
    broken = [i for i, b in enumerate(s.broken_by) if b >= 0]
    assert adv.index.tolist() == broken and len(adv) == len(broken) > 0
    assert adv.stage.tolist() == [s.broken_by[i] for i in broken]
    assert adv.label.tolist() == [s.label[i] for i in broken]
    assert adv.attacks == ["fgsm", "pgd"] and adv.meta["data_sha256"] == report.data.sha256
    assert adv.x_adv.dtype == x.dtype and torch.equal(adv.x_adv, report.adversarial.x_adv)
    # lossless: the very inputs the attacks found, inside the threat model
    assert (adv.x_adv - x[adv.index]).abs().amax() <= EPS + 1e-6
    with torch.no_grad():
        pred = trained_mlp(adv.x_adv).argmax(1)
    assert torch.equal(pred, adv.pred) and bool((pred != adv.label).all())
    # the report's verdicts, from the file alone: robust = correct and not listed
    listed = torch.zeros(len(y), dtype=torch.bool)
    listed[adv.index] = True
    with torch.no_grad():
        correct = trained_mlp(x).argmax(1) == y
    assert (correct & ~listed).tolist() == s.robust
    assert adv.distance.tolist() == pytest.approx([s.distance[i] for i in broken], abs=1e-6)


def test_the_report_holds_them_in_memory_only(report):
    assert report.x_adv is report.adversarial.x_adv
    doc = report.to_dict()  # validated against the schema by conftest
    assert "adversarial" not in doc
    again = advx.Report.from_dict(doc)
    assert again.adversarial is None and again.x_adv is None and again == report


def test_float64_is_kept_exactly(trained_mlp, data, tmp_path):
    x, y = data
    net = copy.deepcopy(trained_mlp).double()
    r = advx.audit(
        net,
        x[:20].double(),
        y[:20],
        advx.Linf(EPS),
        suite=[advx.FGSM(advx.Linf(EPS))],
        eps_curve=None,
        checks=False,
        return_adv=True,
    )
    r.adversarial.save(tmp_path / "a.npz")
    back = AdversarialExamples.load(tmp_path / "a.npz")
    assert back.x_adv.dtype == torch.float64 and torch.equal(back.x_adv, r.adversarial.x_adv)
    with np.load(tmp_path / "a.npz") as z:  # plain numpy reads it too
        assert z["x_adv"].dtype == np.float64 and z["index"].tolist() == back.index.tolist()


def test_not_an_adversarial_file_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="not an advx-adversarial/1 file"):
        AdversarialExamples.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(InputError, match="cannot read"):
        AdversarialExamples.load(tmp_path / "junk.npz")
