"""The Guard object: per-row validation, decisions, fallback, policies bound to a model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from advx.defenses import DetectorAware, FeatureSqueezing
from advx.errors import InputError
from advx.guard import EnergyScore, Guard, MaxLogitScore, Policy, build_detectors
from advx.guard.story import show_decisions
from advx.models import Classifier


@pytest.fixture(scope="module")
def model(trained_mlp):
    return Classifier(trained_mlp)


@pytest.fixture(scope="module")
def digits(mnist_test):
    x, y = mnist_test
    return x[:64].clone(), y[:64].clone()


def test_each_bad_row_is_rejected_with_its_reason_and_the_good_rows_are_decided(model, digits):
    x, _ = digits
    good = x[:3]
    nan = x[3].clone()
    nan[0, 5, 5] = float("nan")
    inf = x[4].clone()
    inf[0, 0, 0] = float("inf")
    high = x[5].clone()
    high[0, 1, 1] = 1.5
    rows = [
        good[0].tolist(),
        x[6, :, :14].tolist(),  # wrong shape
        nan.tolist(),
        good[1].tolist(),
        inf.tolist(),
        high.tolist(),
        [[["a"] * 28] * 28],  # strings
        [[[0.1] * 28] * 27 + [[0.1] * 5]],  # ragged
        good[2].tolist(),
    ]
    guard = Guard(model, input_shape=(1, 28, 28))
    d = guard(rows)
    assert len(d) == len(rows)
    want = {1: "shape", 2: "NaN", 4: "infinity", 5: "bounds", 6: "text", 7: "rectangular"}
    for i, word in want.items():
        assert d[i].action == "reject", i
        assert d[i].label is None and d[i].predicted is None
        assert word in d[i].reasons[0], (i, d[i].reasons)
    labels = model.predict(good).tolist()
    for i, j in ((0, 0), (3, 1), (8, 2)):
        assert d[i].action != "reject"
        assert d[i].predicted == labels[j]
        assert d[i].model_version == guard.version and d[i].policy_hash == guard.policy.hash
    doc = d.to_json()
    assert doc[2]["action"] == "reject" and doc[0]["scores"]["confidence"] > 0


def test_without_a_declared_shape_one_odd_first_row_does_not_fail_the_rest(model, digits):
    x, _ = digits
    rows = [x[0, :, :10].numpy(), x[1].numpy(), x[2].numpy(), x[3].numpy()]
    d = Guard(model)(rows)
    assert d.actions[0] == "reject" and "shape" in d[0].reasons[0]
    assert all(a != "reject" for a in d.actions[1:])


def test_too_many_rows_and_a_scalar_are_input_errors(model):
    guard = Guard(model, max_rows=4)
    with pytest.raises(InputError, match="limit of 4"):
        guard(torch.zeros(5, 1, 28, 28))
    with pytest.raises(InputError, match="scalar"):
        guard(torch.tensor(1.0))


def test_default_policy_abstains_below_half_confidence(model, digits):
    x, _ = digits
    guard = Guard(model)
    noise = torch.full((8, 1, 28, 28), 0.5)  # a grey square: the MLP is unsure
    d = guard(torch.cat([x[:8], noise]))
    for dec in d:
        if dec.confidence < 0.5:
            assert dec.action == "abstain" and dec.label is None
            assert "confidence" in dec.reasons[0]
        else:
            assert dec.action == "accept" and dec.label == dec.predicted


def test_the_strictest_firing_rule_wins(model, digits):
    x, _ = digits
    det = {"energy": EnergyScore(model)}
    pol = Policy(thresholds={"energy": -math.inf}, min_confidence=1.0, on_detect="reject")
    d = Guard(model, detectors=det, policy=pol)(x[:5])
    assert d.actions == ["reject"] * 5
    assert all(len(dec.reasons) == 2 for dec in d)  # both rules fired, both named


def test_fallback_labels_come_from_the_fallback_model(model, digits):
    x, _ = digits

    class Constant(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 10)
            out[:, 7] = 5.0
            return out

    pol = Policy(min_confidence=1.0, on_low_confidence="fallback")  # everything falls back
    d = Guard(model, fallback=Classifier(Constant()), policy=pol)(x[:10])
    assert d.actions == ["fallback"] * 10
    assert d.labels == [7] * 10
    assert [dec.predicted for dec in d] == model.predict(x[:10]).tolist()
    # without a fallback model the guard abstains, and says why
    d = Guard(model, policy=pol)(x[:3])
    assert d.actions == ["abstain"] * 3
    assert "no fallback model configured" in d[0].reasons


def test_a_policy_for_another_model_is_refused(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("energy", model))
    guard.calibrate(x[:300], y[:300], fpr=0.1)
    other = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    with pytest.raises(InputError, match="calibrated for model"):
        Guard(other, detectors={"energy": EnergyScore(other)}, policy=guard.policy)
    with pytest.raises(InputError, match="recalibrate"):
        Guard.from_policy(other, guard.policy)
    # the same weights in a new module are the same model
    twin = Classifier(_copy(model.net))
    assert Guard.from_policy(twin, guard.policy).policy.hash == guard.policy.hash


def _copy(net):
    clone = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    clone.load_state_dict(net.state_dict())
    return clone.eval()


def test_policy_naming_a_detector_the_guard_lacks_is_refused(model):
    with pytest.raises(InputError, match="does not have"):
        Guard(model, policy=Policy(thresholds={"energy": 0.0}))


def test_from_policy_rebuilds_the_detectors_and_decides_the_same(model, mnist_test, tmp_path):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("feature_squeezing,max_logit", model))
    guard.calibrate(x[:300], y[:300], fpr=0.1)
    path = guard.policy.save(tmp_path / "p.toml")
    again = Guard.from_policy(model, path)
    assert isinstance(again.detectors["feature_squeezing"], FeatureSqueezing)
    assert isinstance(again.detectors["max_logit"], MaxLogitScore)
    a, b = guard(x[300:400]), again(x[300:400])
    assert a.actions == b.actions and a.labels == b.labels
    assert {d.policy_hash for d in b} == {guard.policy.hash}


def test_custom_detectors_cannot_be_rebuilt_from_a_file(model, mnist_test):
    x, y = mnist_test
    fs = FeatureSqueezing(model, squeezers=[lambda t: (t > 0.5).float()])
    guard = Guard(model, detectors={"mine": fs})
    guard.calibrate(x[:200], y[:200], fpr=0.1)
    assert guard.policy.detectors["mine"]["kind"] == "custom"
    with pytest.raises(InputError, match="custom detector cannot be rebuilt"):
        Guard.from_policy(model, guard.policy)
    # but it can be used with the detectors passed in
    assert Guard(model, detectors={"mine": fs}, policy=guard.policy).policy == guard.policy


def test_policy_detector_fires_exactly_when_the_guard_does_not_accept(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("feature_squeezing,energy", model))
    guard.calibrate(x[:400], y[:400], fpr=0.1)
    xs = torch.cat([x[400:500], torch.rand(20, 1, 28, 28)])
    flagged = guard.as_detector().detect(xs)
    accepted = torch.tensor([d.accepted for d in guard(xs)])
    assert flagged.any() and (~flagged).any()
    assert torch.equal(flagged, ~accepted)
    # and DetectorAware can attack it: the extra class wins exactly on the flagged inputs
    aware = DetectorAware(model, guard.as_detector())
    assert torch.equal(aware.predict(xs) == 10, flagged)


def test_show_decisions_tabulates_clean_and_adversarial(model, mnist_test):
    x, y = mnist_test
    guard = Guard(model, detectors=build_detectors("energy", model))
    guard.calibrate(x[:300], y[:300], fpr=0.1)
    text = show_decisions(guard, x[300:340], torch.rand(40, 1, 28, 28), y=y[300:340])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["inputs", "n", "accept"]
    assert lines[2].startswith("clean") and lines[3].startswith("adversarial")
    assert guard.policy.hash in lines[-1]


def test_validation_takes_numpy_and_tensors_of_any_real_dtype(model, digits):
    x, _ = digits
    rows = [x[0].numpy().astype(np.float64), (x[1] * 255).round().to(torch.uint8) / 255.0]
    d = Guard(model)(rows)
    assert all(a != "reject" for a in d.actions)
    d = Guard(model)([x[0].to(torch.complex64)])
    assert d.actions == ["reject"] and "dtype" in d[0].reasons[0]


def test_decisions_do_not_change_the_policy(model):
    pol = Policy(min_confidence=0.3)
    g = Guard(model, policy=pol)
    assert dataclasses.asdict(g.policy) == dataclasses.asdict(pol)


def test_decide_returns_the_probabilities_the_decisions_came_from(model, digits):
    x, _ = digits
    guard = Guard(model, input_shape=x.shape[1:])
    rows = [x[0], torch.full_like(x[1], float("nan")), x[2]]
    decisions, probs = guard.decide(rows)
    assert probs is not None and probs.shape == (3, 10)
    assert torch.isnan(probs[1]).all() and decisions[1].action == "reject"
    want = torch.softmax(model.scores(torch.stack([x[0], x[2]])).float(), dim=1)
    assert torch.allclose(probs[[0, 2]], want, atol=1e-6)
    assert [d.predicted for d in (decisions[0], decisions[2])] == want.argmax(1).tolist()
    assert decisions[0].confidence == pytest.approx(float(want[0].max()))


def test_detectors_reuse_the_guards_pass_over_the_input(trained_mlp, digits):
    """Feature squeezing and the energy score need the model's logits at x, which the guard
    has already computed: scoring costs 1 pass + 1 per squeezer, not 2 more, and the scores
    are the same as each detector's own."""
    x, _ = digits
    calls = []
    hook = trained_mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        model = Classifier(trained_mlp)
        guard = Guard(model, detectors=build_detectors("feature_squeezing,energy", model))
        _, scores = guard.score(x)
        assert len(calls) == 1 + 2  # the input, then bits:1 and median:2
        for name, d in guard.detectors.items():
            assert torch.allclose(scores[name], d.score(x).float())
    finally:
        hook.remove()
