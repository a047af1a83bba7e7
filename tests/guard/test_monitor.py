"""Monitoring: metrics per app, and a drift test valid when looked at after every batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from advx.guard import Decision, Guard, Policy
from advx.guard.monitor import DriftTest, Monitor, expected_rates, reason_rule
from advx.models import Classifier
from tests._server import serve


def _stream(p: float, n: int, batch: int, rng: np.random.Generator):
    for _ in range(n // batch):
        yield int(rng.binomial(batch, p)), batch


def test_no_false_alarms_beyond_alpha_under_continuous_monitoring():
    """At the calibrated rate, looking after every batch of a long stream: the share of streams
    that ever alarm stays below alpha; a fixed-sample z-test checked at every look does not."""
    rng = np.random.default_rng(0)
    p0, alpha, runs = 0.05, 0.05, 200
    alarms = naive = 0
    for _ in range(runs):
        t = DriftTest(p0, alpha=alpha, epoch=2000)
        k = n = 0
        naive_hit = False
        for events, size in _stream(p0, 10_000, 50, rng):
            t.update(events, size)
            k, n = k + events, n + size
            z = (k - n * p0) / math.sqrt(n * p0 * (1 - p0))
            naive_hit |= z > 1.645  # one-sided 5% test, as if each look were the only one
        alarms += t.alarm
        naive += naive_hit
    assert alarms / runs <= alpha + 0.03  # binomial slack for 200 runs
    assert naive / runs > 3 * alpha  # the peeking test's false alarms pile up


def test_a_real_rise_is_detected_quickly():
    rng = np.random.default_rng(1)
    t = DriftTest(0.05, alpha=0.01)
    seen = 0
    for events, size in _stream(0.15, 20_000, 20, rng):
        t.update(events, size)
        seen += size
        if t.alarm:
            break
    assert t.alarm and seen < 1500
    st = t.status()
    assert st["drift"] and st["evalue"] >= st["threshold"] and st["observed_rate"] > 0.1


def test_a_rate_below_calibration_is_no_drift_and_epochs_restart():
    rng = np.random.default_rng(2)
    t = DriftTest(0.1, alpha=0.01, epoch=500)
    for events, size in _stream(0.02, 5200, 100, rng):
        t.update(events, size)
    assert not t.alarm and t.k > 5 and t.evalue < 1
    assert t.threshold == pytest.approx(1 / (0.01 * 6 / (math.pi**2 * t.k**2)))
    t.reset()
    assert t.k == 1 and t.total == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="p0"):
        DriftTest(1.5)
    with pytest.raises(ValueError, match="alpha"):
        DriftTest(0.1, alpha=0)


def test_reason_rules_keep_labels_bounded():
    assert reason_rule("feature_squeezing 0.71 > 0.5", ["feature_squeezing"]) == "feature_squeezing"
    assert reason_rule("confidence 0.2 < 0.5") == "low_confidence"
    assert reason_rule("invalid input: holds NaN") == "invalid_input"
    assert reason_rule("query attack suspected") == "query_attack"
    assert reason_rule("no fallback model configured") == "no_fallback"
    assert reason_rule("something new 1 > 2") == "other"


def test_expected_rates_from_a_policy():
    assert expected_rates(Policy()) == {}
    p = Policy(thresholds={"fs": 0.5}, guarantees={"fpr": 0.05})
    assert expected_rates(p) == {"abstain": 0.05, "flag": 0.05}
    # calibration's report: the null is what calibration could have produced
    p = Policy(guarantees={"fpr": {"target": 0.02, "measured": 0.025, "interval": [0.01, 0.04]}})
    assert expected_rates(p) == {"abstain": 0.04}
    p = Policy(
        thresholds={"fs": 0.5},
        guarantees={
            "fpr": {"target": 0.05, "interval": [0.02, 0.045]},
            "selective_risk": {"coverage": 0.8, "n": 2000},
        },
    )
    rates = expected_rates(p)
    assert rates["flag"] == 0.05
    assert rates["abstain"] == pytest.approx(0.2 + math.sqrt(math.log(100) / 4000))


def _decision(action, fs, conf=0.9):
    reasons = (f"fs {fs} > 0.5",) if fs > 0.5 else ()
    label = 1 if action == "accept" else None
    return Decision(action, label, 1, conf, {"fs": fs, "confidence": conf}, reasons, "v", "h")


def test_monitor_counts_and_feeds_the_drift_tests():
    from prometheus_client import generate_latest

    m = Monitor(
        name="m",
        model_version="v1",
        policy_hash="h1",
        detectors=["fs"],
        thresholds={"fs": 0.5},
        expected={"abstain": 0.05, "flag": 0.05},
    )
    m2 = Monitor(name="other", model_version="v2", policy_hash="h2")
    ds = [_decision("accept", 0.1)] * 8 + [_decision("review", 0.9)] * 2
    ds.append(Decision("reject", None, None, None, {}, ("invalid input: NaN",), "v1", "h1"))
    m.observe_decisions(ds)
    text = generate_latest(m.registry).decode()
    assert 'advx_guard_decisions_total{action="accept"} 8.0' in text
    assert 'advx_guard_decision_reasons_total{action="review",reason="fs"} 2.0' in text
    assert 'advx_guard_decision_reasons_total{action="reject",reason="invalid_input"} 1.0' in text
    assert 'advx_guard_detector_score_count{detector="fs"} 10.0' in text  # not the invalid row
    assert 'advx_guard_recent_rate{rate="abstain"} 0.2' in text
    assert 'model_version="v1"' in text
    assert m.drift["abstain"].total == 10 and m.drift["flag"].total_events == 2
    # registries are per app
    assert "advx_guard_decisions_total{" not in generate_latest(m2.registry).decode()
    st = m.status()
    assert st["policy_hash"] == "h1" and set(st["drift"]) == {"abstain", "flag"}


def test_a_served_guard_reports_drift(trained_mlp):
    httpx = pytest.importorskip("httpx")
    from advx.guard.service import create_app

    g = Guard(Classifier(trained_mlp, bounds=(0, 1)), input_shape=(1, 28, 28))
    # calibration promised 2% abstentions; faint noise (no digit at all) is mostly abstained on
    app = create_app(g, name="m", expected_rates={"abstain": 0.02})
    with serve(app) as url:
        h = httpx.get(f"{url}/health").json()
        assert h["drift"]["abstain"]["drift"] is False
        for _ in range(8):
            x = torch.rand(32, 1, 28, 28) * 0.2
            assert httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).status_code == 200
        h = httpx.get(f"{url}/health").json()
        assert h["drift"]["abstain"]["drift"] is True, h["drift"]
        assert h["recent_rates"]["abstain"] > 0.5
        text = httpx.get(f"{url}/metrics").text
        assert 'advx_guard_drift{rate="abstain"} 1.0' in text
