"""Confidence intervals: the Wilson and Newcombe intervals themselves, and one on every accuracy
of a report (JSON, schema, HTML, the terminal summary)."""

from __future__ import annotations

import jsonschema
import pytest
import torch

import advx
from advx.audit import Report
from advx.audit.report import json_schema
from advx.audit.stats import newcombe, wilson

EPS = 0.05


def test_wilson_matches_published_values():
    # Newcombe (1998), table I: 81/263 -> 0.2553..0.3662; 15/148 -> 0.0624..0.1605
    assert wilson(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)
    assert wilson(15, 148) == pytest.approx([0.0624, 0.1605], abs=1e-4)
    # the ends: 0 and n successes pin one end exactly, no samples say nothing
    assert wilson(0, 10) == [0.0, pytest.approx(0.2775, abs=1e-4)]
    assert wilson(10, 10) == [pytest.approx(0.7225, abs=1e-4), 1.0]
    assert wilson(0, 0) == [0.0, 1.0]
    lo99, hi99 = wilson(81, 263, level=0.99)
    assert lo99 < 0.2553 and hi99 > 0.3662  # a higher level, a wider interval
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_wilson_covers_the_true_share_about_95_percent_of_the_time():
    g = torch.Generator().manual_seed(0)
    for p, n in ((0.9, 200), (0.5, 40), (0.97, 100)):
        draws = torch.binomial(torch.full((4000,), float(n)), torch.full((4000,), p), generator=g)
        covered = sum(lo <= p <= hi for lo, hi in (wilson(int(k), n) for k in draws.tolist()))
        assert 0.92 <= covered / 4000 <= 0.98, (p, n, covered / 4000)


def test_newcombe_matches_the_published_example():
    # Newcombe (1998), example (a): 56/70 - 48/80 = 0.2000, 95% interval 0.0524..0.3339
    assert newcombe(48, 80, 56, 70) == pytest.approx([0.0524, 0.3339], abs=1e-4)
    lo, hi = newcombe(150, 200, 150, 200)
    assert lo < 0 < hi and lo == pytest.approx(-hi)


@pytest.fixture(scope="module")
def report(trained_mlp, mnist_test):
    x, y = mnist_test
    suite = [advx.FGSM(advx.Linf(EPS)), advx.PGD(advx.Linf(EPS), steps=5)]
    return advx.audit(
        trained_mlp,
        x[:60],
        y[:60],
        advx.Linf(EPS),
        suite=suite,
        eps_curve=[0.03, 0.05],
        checks=False,
    )


def test_every_accuracy_in_the_report_has_its_wilson_interval(report):
    s = report.samples
    n = report.data.n
    assert report.ci_level == 0.95
    assert report.clean_accuracy_ci == wilson(sum(s.clean_correct), n)
    assert report.robust_accuracy_ci == wilson(sum(s.robust), n)
    lo, hi = report.robust_accuracy_ci
    assert lo < report.robust_accuracy < hi and hi - lo > 0.1  # 60 samples: a wide interval
    for stage in report.cascade:
        left = sum(c and (b < 0 or b > stage.stage) for c, b in zip(s.clean_correct, s.broken_by))
        assert stage.robust_accuracy_after_ci == wilson(left, n)
    for row in report.per_class:
        mine = [i for i, label in enumerate(s.label) if label == row.label]
        assert row.robust_accuracy_ci == wilson(sum(s.robust[i] for i in mine), row.n)
        assert row.clean_accuracy_ci == wilson(sum(s.clean_correct[i] for i in mine), row.n)
    curve = report.eps_curve
    assert len(curve.robust_accuracy_ci) == len(curve.eps)
    for acc, (lo, hi) in zip(curve.robust_accuracy, curve.robust_accuracy_ci):
        assert lo <= acc <= hi


def test_intervals_round_trip_and_older_reports_still_load(report, tmp_path):
    doc = report.to_dict()  # validated against the schema by the conftest fixture
    assert Report.from_dict(doc).robust_accuracy_ci == report.robust_accuracy_ci
    # a report written before the intervals existed: still valid, still readable
    for key in ("clean_accuracy_ci", "robust_accuracy_ci", "ci_level"):
        del doc[key]
    for row in doc["cascade"]:
        del row["robust_accuracy_after_ci"]
    for row in doc["per_class"]:
        del row["clean_accuracy_ci"], row["robust_accuracy_ci"]
    del doc["eps_curve"]["robust_accuracy_ci"]
    jsonschema.validate(doc, json_schema())
    old = Report.from_dict(doc)
    assert old.robust_accuracy_ci is None and old.summary_lines()[0].startswith("clean accuracy")
    bad = report.to_dict()
    bad["robust_accuracy_ci"] = [0.2, 1.3]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schema())


def test_the_summary_and_the_page_show_the_intervals(report):
    lo, hi = report.robust_accuracy_ci
    first = report.summary_lines()[0]
    assert f"[{lo:.1%}, {hi:.1%}]" in first and "95% Wilson" in first
    page = report.to_html()
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in page and 'id="robust-accuracy-ci"' in page
    row = report.per_class[0]
    assert f"[{100 * row.robust_accuracy_ci[0]:.1f}, {100 * row.robust_accuracy_ci[1]:.1f}]" in page


def test_the_page_explains_the_eps_curve_and_hides_an_infinite_margin(report):
    import dataclasses

    from advx.audit.report import Gate

    page = report.to_html()
    assert 'id="eps-curve-note"' in page and "upper bound on the true robust accuracy" in page
    stage = dataclasses.replace(
        report.cascade[-1], gate=Gate(closest=0.15, margin_at_most=float("inf"), attacked=3)
    )
    gated = dataclasses.replace(report, cascade=[*report.cascade[:-1], stage])
    page = gated.to_html()
    assert "only on the 3 points closest" in page and "&le; inf" not in page
    one = dataclasses.replace(stage, gate=Gate(closest=0.15, margin_at_most=0.1, attacked=1))
    page1 = dataclasses.replace(report, cascade=[*report.cascade[:-1], one]).to_html()
    assert "only on the 1 point closest" in page1 and "1 points" not in page1
    stage = dataclasses.replace(stage, gate=Gate(closest=0.15, margin_at_most=1.5, attacked=3))
    page = dataclasses.replace(report, cascade=[*report.cascade[:-1], stage]).to_html()
    assert "logit margin &le; 1.5" in page
