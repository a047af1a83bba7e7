"""Two audits compared: deltas with intervals, the samples newly broken, the regression gate,
and the refusal to compare audits of different data, threat or suite."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import advx
from advx.audit import Comparison, compare
from advx.audit.gate import audit_checks, junit, markdown
from advx.audit.stats import newcombe, wilson
from advx.errors import InputError

EPS = 0.05
N = 60


def suite():
    return [advx.FGSM(advx.Linf(EPS)), advx.PGD(advx.Linf(EPS), steps=3)]


def run(model, x, y, *, eps=EPS, the_suite=None):
    return advx.audit(
        model,
        x,
        y,
        advx.Linf(eps),
        suite=the_suite or suite(),
        eps_curve=None,
        checks=False,
    )


@pytest.fixture(scope="module")
def data(mnist_test):
    x, y = mnist_test
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def weak():
    """A barely trained model: the regression a gate must catch."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.fixture(scope="module")
def good_report(trained_mlp, data):
    return run(trained_mlp, *data)


@pytest.fixture(scope="module")
def weak_report(weak, data):
    return run(weak, *data)


def test_the_same_model_twice_changes_nothing(trained_mlp, data, good_report):
    again = run(trained_mlp, *data)
    c = compare(good_report, again, max_drop=0.0)
    assert c.passed and c.robust_accuracy.delta == 0 and c.newly_broken == c.newly_robust == []
    assert c.base.sha256 == c.new.sha256 == good_report.model.sha256
    lo, hi = c.robust_accuracy.delta_ci
    assert lo < 0 < hi  # 60 samples: no change is also "could be a few points either way"
    assert "within the noise of 60 samples" in c.checks[0].message


def test_a_regression_fails_the_gate_and_names_the_samples(good_report, weak_report):
    c = compare(good_report, weak_report, max_drop=0.01)
    assert isinstance(c, Comparison) and not c.passed
    base, new = good_report.samples, weak_report.samples
    assert c.newly_broken == [i for i in range(N) if base.robust[i] and not new.robust[i]]
    assert c.newly_robust == [i for i in range(N) if new.robust[i] and not base.robust[i]]
    assert c.newly_broken  # the weak model loses samples the trained one kept
    r = c.robust_accuracy
    assert r.base == pytest.approx(good_report.robust_accuracy, abs=1e-6)
    assert r.new == pytest.approx(weak_report.robust_accuracy, abs=1e-6)
    assert r.delta == pytest.approx(r.new - r.base, abs=1e-6) and r.delta < -0.01
    assert r.delta_ci == newcombe(sum(base.robust), N, sum(new.robust), N)
    assert r.new_ci == weak_report.robust_accuracy_ci
    assert r.base_ci == good_report.robust_accuracy_ci
    assert c.base.sha256 == good_report.model.sha256 != c.new.sha256 == weak_report.model.sha256
    (drop,) = [k for k in c.checks if k.kind == "regression"]
    assert not drop.passed and "--max-drop 1.00%" in drop.message
    assert [s.robust_accuracy_after.new for s in c.cascade] == pytest.approx(
        [s.robust_accuracy_after for s in weak_report.cascade], abs=1e-6
    )
    # per class: the counts behind each delta add up to the overall one
    kept_new = sum(round(k.robust_accuracy.new * k.n) for k in c.per_class)
    assert kept_new == sum(new.robust) and sum(k.n for k in c.per_class) == N
    for k in c.per_class:
        mine = [i for i in range(N) if base.label[i] == k.label]
        assert k.robust_accuracy.base_ci == wilson(sum(base.robust[i] for i in mine), len(mine))
    text = "\n".join(c.summary_lines())
    assert "newly broken" in text and "FAIL" in text and good_report.model.sha256[:12] in text


def test_an_improvement_passes_and_the_bar_is_inclusive(good_report, weak_report):
    c = compare(weak_report, good_report, max_drop=0.0)
    assert c.passed and c.robust_accuracy.delta > 0 and c.newly_robust
    drop = good_report.robust_accuracy - weak_report.robust_accuracy
    assert compare(good_report, weak_report, max_drop=round(drop, 6)).passed  # exactly the drop
    assert not compare(good_report, weak_report, max_drop=round(drop, 6) - 0.001).passed
    # no bar: the deltas only (and the new audit's reliability)
    assert compare(good_report, weak_report).passed


def test_an_unreliable_new_audit_fails_the_gate(good_report, weak_report):
    doc = weak_report.to_dict()
    doc["reliable"] = False
    doc["findings"] = [
        {"code": "masked-gradients", "severity": "error", "message": "m", "advice": "a"}
        | {"details": {}}
    ]
    bad = advx.Report.from_dict(doc)
    c = compare(weak_report, bad)
    assert not c.passed and "masked-gradients" in c.failed[0].message


def test_different_data_threat_or_suite_are_refused(trained_mlp, mnist_test, good_report):
    x, y = mnist_test
    other_data = run(trained_mlp, x[N : 2 * N], y[N : 2 * N])
    with pytest.raises(InputError, match="data differ"):
        compare(good_report, other_data)
    other_eps = run(trained_mlp, x[:N], y[:N], eps=0.1)
    with pytest.raises(InputError, match=r"threat models differ \(linf eps 0.05 .* linf eps 0.1"):
        compare(good_report, other_eps)
    other_suite = run(trained_mlp, x[:N], y[:N], the_suite=[advx.FGSM(advx.Linf(EPS))])
    with pytest.raises(InputError, match="suites differ"):
        compare(good_report, other_suite)
    with pytest.raises(InputError, match="max_drop"):
        compare(good_report, good_report, max_drop=2)


def test_files_json_markdown_and_junit(good_report, weak_report, tmp_path):
    good_report.save(tmp_path / "base.json")
    weak_report.save(tmp_path / "new.json")
    c = compare(tmp_path / "base.json", str(tmp_path / "new.json"), max_drop=0.01)
    assert c.base.label.endswith("base.json") and not c.passed
    doc = json.loads(c.to_json())
    assert doc["schema"] == "advx-comparison/1" and doc["newly_broken"] == c.newly_broken
    assert doc["per_class"][0]["class"] == c.per_class[0].label
    assert doc["robust_accuracy"]["delta_ci"] == c.robust_accuracy.delta_ci
    c.save(tmp_path / "c.json")
    back = Comparison.load(tmp_path / "c.json")
    assert back.to_dict() == doc and back.checks == c.checks and not back.passed
    with pytest.raises(InputError, match="not an advx-comparison/1"):
        Comparison.load(tmp_path / "base.json")
    with pytest.raises(InputError, match="no report file"):
        compare(tmp_path / "nope.json", good_report)

    checks = audit_checks(weak_report, fail_under=0.5) + [
        k for k in c.checks if k.kind == "regression"
    ]
    md = markdown(checks=checks, report=weak_report, comparison=c)
    assert md.startswith("## advx audit: FAIL") and "| **robust** |" in md
    assert f"{len(c.newly_broken)} samples newly broken" in md and "Against the baseline" in md
    root = ET.fromstring(junit(checks, suite="advx audit"))
    cases = root.findall("./testsuite/testcase")
    assert [k.get("name") for k in cases] == [k.name for k in checks]
    failed = [k for k in cases if k.find("failure") is not None]
    assert len(failed) == sum(not k.passed for k in checks) == int(root.get("failures")) == 2
    page = c.to_html()
    assert 'id="verdict">FAIL' in page and str(c.newly_broken[0]) in page
    assert c.new.sha256 in page and c.base.sha256 in page


def test_a_report_without_intervals_still_compares(good_report, weak_report):
    old = copy.deepcopy(good_report.to_dict())
    for key in ("clean_accuracy_ci", "robust_accuracy_ci", "ci_level"):
        old.pop(key)
    c = compare(advx.Report.from_dict(old), weak_report)
    assert c.robust_accuracy.base_ci == good_report.robust_accuracy_ci
