"""The audit's eps curve: which way each point was obtained, and never above the cascade."""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
import torch

import advx
from advx.audit.eps_curve import _eps_curve, choose_method
from advx.audit.report import Report

EPS = 0.1
OLD = Path(__file__).parent / "data" / "report-v1-untyped.json"


def _suite():
    return [advx.FGSM(advx.Linf(EPS)), advx.PGD(advx.Linf(EPS), steps=10)]


@pytest.fixture(scope="module")
def data(mnist_test):
    x, y = mnist_test
    return x[:60], y[:60]


@pytest.fixture(scope="module")
def report(trained_mlp, data):
    x, y = data
    return advx.audit(trained_mlp, x, y, advx.Linf(EPS), suite=_suite(), subset=40)


def _state(report, *, distance=None):
    """What _eps_curve reads of the cascade state, from a report (or with made-up distances)."""
    s = report.samples
    d = [math.nan if v is None else v for v in s.distance] if distance is None else distance
    return types.SimpleNamespace(
        clean_correct=torch.tensor(s.clean_correct),
        broken_by=torch.tensor(s.broken_by if distance is None else [0] * len(d)),
        distance=torch.tensor(d, dtype=torch.float64),
    )


def test_the_way_is_chosen_by_cost():
    # auto: FMN below eps (where APGD finds little and runs every step), APGD above it
    assert choose_method("auto", EPS, "linf") == "mixed"
    assert choose_method([0.05], EPS, "l2") == "runs"  # one point below: one run is cheaper
    assert choose_method([0.02, 0.05, 0.1], EPS, "l1") == "mixed"
    assert choose_method([0.1, 0.2, 0.3], EPS, "linf") == "runs"  # nothing below eps
    assert choose_method("runs", EPS, "linf") == "runs"
    assert choose_method("min-norm", EPS, "l2") == "min-norm"


def test_the_default_curve_says_per_point_which_way_it_was_obtained(report):
    c = report.eps_curve
    assert c.source == "mixed" and c.attack == "fmn (100 steps), apgd-ce (50 steps)"
    assert c.n == 40 and len(c.method) == len(c.eps) == len(c.from_cascade)
    assert c.eps == pytest.approx([EPS * f for f in (0, 0.25, 0.5, 0.75, 1, 1.5, 2)])
    ways = [m.split(" + ")[0] for m in c.method]
    assert ways == ["min-norm fmn"] * 4 + ["cascade"] + ["apgd-ce at eps"] * 2
    assert [("cascade" in m.split(" + ")[1:]) for m in c.method] == [k > 0 for k in c.from_cascade]
    clean = sum(report.samples.clean_correct[:40]) / 40
    assert c.robust_accuracy[0] == pytest.approx(clean)  # at eps 0: the clean accuracy
    assert c.robust_accuracy_large_eps == 0.0 and c.large_eps == 1.0


def test_the_point_at_the_audited_eps_is_never_above_the_cascade(report):
    c = report.eps_curve
    s = report.samples
    cascade = sum(s.robust[:40]) / 40
    assert c.robust_accuracy_cascade == pytest.approx(cascade)
    at = c.eps.index(pytest.approx(EPS))
    assert c.robust_accuracy[at] == pytest.approx(cascade - c.broken_beyond_cascade / 40)


def test_the_cascade_s_examples_count_at_every_eps_from_their_distance(trained_mlp, data, report):
    # a made-up cascade that broke every sample at distance 0.05: whatever FMN finds, no point
    # from 0.05 on may claim a sample robust, and the points below it are FMN's alone
    x, y = data
    threat = advx.Linf(EPS)
    full = _state(report, distance=[0.05] * len(y))
    got = _eps_curve(trained_mlp, x, y, threat, "min-norm", full, seed=0, subset=40)
    real = _eps_curve(trained_mlp, x, y, threat, "min-norm", _state(report), seed=0, subset=40)
    assert got["source"] == "minimum-norm" and got["attack"] == "fmn (100 steps)"
    assert got["robust_accuracy"] == sorted(got["robust_accuracy"], reverse=True)  # one run
    for e, a, a_real, k, m in zip(
        got["eps"], got["robust_accuracy"], real["robust_accuracy"], got["from_cascade"],
        got["method"],
    ):  # fmt: skip
        if e >= 0.05:
            assert a == 0.0 and m == ("min-norm fmn + cascade" if k else "min-norm fmn")
            assert k == round(a_real * 40)  # what FMN alone left robust, the cascade broke
        else:
            assert a == a_real and k == 0 and m == "min-norm fmn"
    assert got["robust_accuracy_cascade"] == 0.0 and got["broken_beyond_cascade"] == 0


def test_runs_give_one_apgd_point_per_eps_and_the_same_guarantee(trained_mlp, data, report):
    x, y = data
    got = _eps_curve(trained_mlp, x, y, advx.Linf(EPS), "runs", _state(report), seed=0, subset=40)
    assert got["source"] == "runs" and len(got["eps"]) == 6
    assert all(m.split(" + ")[0] == "apgd-ce at eps" for m in got["method"])
    at = got["eps"].index(pytest.approx(EPS))
    assert got["robust_accuracy"][at] <= got["robust_accuracy_cascade"]
    assert got["robust_accuracy"][at] == pytest.approx(
        got["robust_accuracy_cascade"] - got["broken_beyond_cascade"] / 40
    )


def test_a_bad_spec_is_refused(trained_mlp, data, report):
    x, y = data
    for bad, message in (("fast", "expected 'auto'"), ([0.1, -1.0], "finite eps values >= 0")):
        with pytest.raises(advx.errors.InputError, match=message):
            _eps_curve(trained_mlp, x, y, advx.Linf(EPS), bad, _state(report), seed=0, subset=8)


def test_the_report_explains_the_curve_on_the_page_and_in_the_terminal(report):
    c = report.eps_curve
    notes = report.curve_notes()
    assert f"the first 40 samples of {report.data.n}" in notes[0]
    assert all(part in notes[0] for part in c.attack.split(", "))  # fmn, then apgd-ce
    assert any("upper bound" in n for n in notes)
    at = [n for n in notes if n.startswith(f"At the audited eps {EPS:.4g}")]
    assert at and f"{c.robust_accuracy_cascade:.1%} on the same samples" in at[0]
    assert f"{report.robust_accuracy:.1%} on all {report.data.n}" in at[0]
    lines = "\n".join(report.summary_lines())
    assert "eps curve" in lines and notes[0] in lines
    page = report.to_html()
    assert 'id="eps-curve-method"' in page and "min-norm fmn" in page
    assert '<td class="how">apgd-ce at eps</td></tr>' in page  # the large eps: an APGD run
    assert notes[0].replace("'", "&#39;") in page


def test_a_curve_that_beats_the_cascade_says_the_headline_overstates(report):
    c = dataclasses.replace(report.eps_curve, broken_beyond_cascade=3)
    notes = dataclasses.replace(report, eps_curve=c).curve_notes()
    assert any("broke 3 samples" in n and "overstates" in n for n in notes)


def test_an_old_report_s_curve_still_loads_and_is_explained_as_before():
    r = Report.load(OLD)
    old = json.loads(OLD.read_text())["eps_curve"]
    assert r.eps_curve.method is None and r.eps_curve.eps == old["eps"]
    notes = r.curve_notes()
    assert len(notes) == 2 and "attack alone" in notes[1]
    assert 'id="eps-curve-method"' not in r.to_html()


def test_a_weak_cascade_gets_a_finding_when_the_curve_breaks_what_it_missed(trained_mlp, data):
    x, y = data
    eps = 0.05  # where FGSM alone leaves points that FMN finds (at 0.1 nearly nothing is robust)
    suite = [advx.FGSM(advx.Linf(eps))]
    weak = advx.audit(trained_mlp, x, y, advx.Linf(eps), suite=suite, subset=40)
    beyond = weak.eps_curve.broken_beyond_cascade
    assert beyond and beyond > 0  # FGSM alone misses points FMN and APGD find within eps
    found = [f for f in weak.findings if f.code == "cascade-missed-points"]
    assert len(found) == 1 and found[0].severity == "warning"
    assert found[0].details["broken_beyond_cascade"] == beyond


def test_no_finding_when_the_curve_breaks_nothing_beyond_the_cascade():
    from advx.audit.checks import check_curve

    codes = {f.code for f in check_curve([0.1, 0.2], [0.5, 0.2], n=40, eps0=0.1, beyond=0)}
    assert "cascade-missed-points" not in codes
    codes = {f.code for f in check_curve([0.1, 0.2], [0.5, 0.2], n=40, eps0=0.1, beyond=2)}
    assert "cascade-missed-points" in codes
