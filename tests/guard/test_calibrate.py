"""Calibration: the stated guarantees hold, on real models and in simulation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import advx
from advx._io import sha256_tensors
from advx.errors import InputError
from advx.guard import Guard, build_detectors
from advx.guard._binom import binom_cdf, binom_sf, clopper_pearson
from advx.guard.calibrate import _conformal_k, _fixed_sequence, _floors, _union_thresholds
from advx.models import Classifier

# ---- the statistics, against scipy --------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, p", [(0, 1, 0.3), (3, 10, 0.2), (50, 1000, 0.05), (10, 1000, 0.05), (7, 7, 0.5)]
)
def test_binomial_tails_match_scipy(k, n, p):
    assert binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-15)
    assert binom_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("k, n", [(0, 50), (25, 500), (100, 100), (3, 20), (4000, 80000)])
def test_clopper_pearson_matches_scipy(k, n):
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    lo, hi = clopper_pearson(k, n, 0.95)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


# ---- the guarantees in simulation (known distributions, many calibration draws) --------------


def test_union_fpr_is_controlled_and_its_interval_covers_in_simulation():
    """Two rules with different score scales; the true flag rate of the calibrated union is
    known in closed form. Over many calibration draws its mean is <= fpr and the reported
    interval covers it at least at its level."""
    g = torch.Generator().manual_seed(0)
    fpr, trials, n = 0.1, 200, 400
    rates, covered = [], 0
    for _ in range(trials):
        # rule a ~ Exp(1), rule b ~ 10 * U(0, 1), independent
        a = -torch.log(torch.rand(n, generator=g))
        b = 10 * torch.rand(n, generator=g)
        half = n // 2
        th, flagged = _union_thresholds(
            {"a": a[:half], "b": b[:half]}, {"a": a[half:], "b": b[half:]}, fpr
        )
        pass_a = 1 - math.exp(-th["a"])  # P(a <= t)
        pass_b = min(1.0, max(0.0, th["b"] / 10))
        true = 1 - pass_a * pass_b
        rates.append(true)
        lo, hi = clopper_pearson(int(flagged.sum()), flagged.numel(), 0.9)
        covered += lo <= true <= hi
    mean = sum(rates) / trials
    assert mean <= fpr + 0.005  # the conformal promise, up to simulation noise
    assert mean > fpr - 0.03  # and not wastefully strict
    assert covered / trials >= 0.9 - 0.03


def test_selective_risk_guarantee_holds_in_simulation():
    """Confidence c ~ U(0, 1) and P(wrong | c) = 1 - c: the selective risk of floor t is
    (1 - t) / 2. The chosen floor's true risk exceeds alpha in at most delta of the draws."""
    g = torch.Generator().manual_seed(1)
    alpha, delta, trials, n = 0.2, 0.1, 200, 600
    failures, chosen_any = 0, 0
    for _ in range(trials):
        conf = torch.rand(2 * n, generator=g, dtype=torch.float64)
        wrong = torch.rand(2 * n, generator=g, dtype=torch.float64) > conf
        floors = _floors(conf[:n], wrong[:n], n_scale=1.0, alpha=alpha, delta=delta)
        chosen, _ = _fixed_sequence(floors, conf[n:], wrong[n:], alpha, delta)
        if chosen is None:
            continue
        chosen_any += 1
        failures += (1 - chosen) / 2 > alpha
    assert chosen_any > trials * 0.9  # it does certify a floor almost always
    assert failures / trials <= delta + 0.03


def test_conformal_rank_needs_enough_inputs():
    assert _conformal_k(19, 0.05, "t") == 19
    with pytest.raises(InputError, match="give at least"):
        _conformal_k(10, 0.05, "t")


# ---- on a real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(trained_mlp):
    return Classifier(trained_mlp)


@pytest.fixture(scope="module")
def calibrated(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("feature_squeezing,energy", model))
    report = guard.calibrate(x[:600], y[:600], fpr=0.05)
    return guard, report


def test_measured_fpr_on_held_out_clean_data_is_within_the_interval(calibrated, mnist_test):
    guard, report = calibrated
    x, _ = mnist_test
    held = guard(x[600:])  # 400 clean digits calibration never saw
    rate = 1 - held.count("accept") / len(held)
    lo, hi = report.fpr["interval"]
    assert lo <= rate <= hi, (rate, lo, hi)
    assert 0 < report.fpr["measured"] <= 0.05 + 1e-9
    assert report.fpr["target"] == 0.05 and report.fpr["level"] == 0.95
    # the policy is the union: each rule alone flags less than the whole budget
    probs, scores = guard.score(x[600:])
    for name, t in report.thresholds.items():
        alone = float((scores[name] > t).float().mean())
        assert 0 < alone < rate
    assert report.min_confidence > 0  # the confidence floor took part of the budget


def test_a_calibrated_guard_flags_most_pgd_examples(calibrated, model, mnist_test):
    guard, _ = calibrated
    x, y = mnist_test
    res = advx.PGD(advx.Linf(0.2), steps=10, seed=0)(model, x[600:700], y[600:700])
    adv = guard(res.x_adv[res.success])
    assert res.success.float().mean() > 0.9  # the undefended MLP is broken...
    caught = 1 - adv.count("accept") / len(adv)
    assert caught > 0.5  # ...and the guard stops most of what broke it (clean: ~5%)
    assert {a for a in adv.actions} <= {"accept", "abstain", "review"}


def test_the_policy_records_what_calibration_promised_and_on_what(calibrated, model, mnist_test):
    guard, report = calibrated
    x, y = mnist_test
    pol = guard.policy
    assert pol is report.policy
    assert pol.model_fingerprint == model.fingerprint()
    assert pol.calibration["data_sha256"] == sha256_tensors(x[:600], y[:600])
    assert pol.calibration["n"] == 600 and pol.calibration["input_shape"] == [1, 28, 28]
    assert pol.guarantees["fpr"]["interval"] == report.fpr["interval"]
    assert set(pol.detectors) == set(pol.thresholds) == {"feature_squeezing", "energy"}
    assert pol.detectors["energy"] == {"kind": "energy", "temperature": 1.0}
    assert guard.detectors["energy"].threshold == pol.thresholds["energy"]
    text = "\n".join(report.lines())
    assert "interval" in text and pol.hash in text


def test_selective_risk_on_held_out_data_meets_the_target(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("energy", model))
    report = guard.calibrate(x[:600], y[:600], fpr=0.05, risk=0.05, delta=0.1)
    r = report.selective_risk
    assert r is not None and r["target"] == 0.05 and r["upper_bound"] <= 0.05 + 1e-9
    assert 0.5 < r["coverage"] < 1.0  # it abstains on some, not all
    held = guard(x[600:])
    acc = [(d.label, int(t)) for d, t in zip(held, y[600:]) if d.accepted]
    risk = sum(a != b for a, b in acc) / len(acc)
    plain = float((model.predict(x[600:]) != y[600:]).float().mean())
    assert risk <= 0.05 < plain  # the model alone errs more than the target; guarded, it does not
    assert guard.policy.guarantees["selective_risk"]["floor"] == guard.policy.min_confidence


def test_an_uncertifiable_risk_is_an_input_error(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model)
    with pytest.raises(InputError, match="cannot certify a selective risk of 0.001"):
        guard.calibrate(x[:200], y[:200], risk=0.001)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"fpr": 0.0}, "fpr"),
        ({"fpr": 1.5}, "fpr"),
        ({"delta": 1.0}, "delta"),
        ({"risk": -0.1}, "risk"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_input_errors(model, mnist_test, kw, words):
    x, y = mnist_test
    with pytest.raises(InputError, match=words):
        Guard(model).calibrate(x[:100], y[:100], **kw)


def test_bad_data_is_an_input_error(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("energy", model))
    with pytest.raises(InputError, match="give at least"):
        guard.calibrate(x[:12], y[:12], fpr=0.05)
    with pytest.raises(InputError):
        guard.calibrate(x[:100] * 3, y[:100])  # outside the bounds
    with pytest.raises(InputError):
        guard.calibrate(x[:100], y[:50])


def test_calibration_is_reproducible_and_seeded(model, mnist_test):
    x, y = mnist_test
    a = Guard(model, detectors=build_detectors("energy", model)).calibrate(x[:300], y[:300])
    b = Guard(model, detectors=build_detectors("energy", model)).calibrate(x[:300], y[:300])
    c = Guard(model, detectors=build_detectors("energy", model)).calibrate(x[:300], y[:300], seed=1)
    assert a.policy.hash == b.policy.hash
    assert c.policy.hash != a.policy.hash
