"""Detectors: feature squeezing's score, calibration, the detector-aware model, adaptive success."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advx
from advx.defenses import (
    Detector,
    DetectorAware,
    Ensemble,
    EnsembleDisagreement,
    FeatureSqueezing,
    adaptive_success,
    bit_depth,
    median_smooth,
)
from advx.errors import InputError


class ByMean(Detector):
    """A detector whose score is the mean pixel value: easy to reason about."""

    def _score(self, x, *, bpda=True):
        return x.flatten(1).mean(dim=1)


def test_feature_squeezing_score_is_the_papers(clf, trained_mlp, batch):
    x, _ = batch
    fs = FeatureSqueezing(clf)  # 1-bit depth and 2x2 median by default: the paper's MNIST pair
    assert fs.names == ["bits:1", "median:2"]
    with torch.no_grad():
        p = F.softmax(trained_mlp(x), 1)
        d_bits = (p - F.softmax(trained_mlp(bit_depth(x, 1)), 1)).abs().sum(1)
        d_median = (p - F.softmax(trained_mlp(median_smooth(x, 2)), 1)).abs().sum(1)
    assert torch.allclose(fs.score(x), torch.maximum(d_bits, d_median), atol=1e-5)
    assert torch.allclose(FeatureSqueezing(clf, ["bits:1"]).score(x), d_bits, atol=1e-5)
    assert bool((fs.score(x) >= 0).all()) and bool((fs.score(x) <= 2).all())


def test_calibration_reaches_the_chosen_false_positive_rate(clf, mnist_test):
    x, _ = mnist_test
    fs = FeatureSqueezing(clf)
    assert fs.calibrate(x[:500], fpr=0.05) is fs
    assert fs.threshold is not None and fs.fpr == 0.05
    on_calibration = float(fs.detect(x[:500]).float().mean())
    assert 0.05 - 1 / 500 - 1e-6 <= on_calibration <= 0.05 + 1e-6
    held_out = float(fs.detect(x[500:]).float().mean())
    assert abs(held_out - 0.05) < 3 * (0.05 * 0.95 / 500) ** 0.5  # three standard errors
    assert float(fs.calibrate(x[:500], fpr=0.2).detect(x[500:]).float().mean()) > held_out


def test_calibration_and_detection_say_what_is_missing(clf, batch):
    x, _ = batch
    fs = FeatureSqueezing(clf)
    with pytest.raises(InputError, match="calibrate"):
        fs.detect(x)
    with pytest.raises(InputError, match="fpr"):
        fs.calibrate(x, fpr=1.5)
    with pytest.raises(InputError, match="at least 100"):
        fs.calibrate(x[:10], fpr=0.01)
    with pytest.raises(InputError, match="squeezer"):
        FeatureSqueezing(clf, ["blur:3"])
    with pytest.raises(InputError, match="calibrate"):
        DetectorAware(clf, fs)


def test_adaptive_success_is_misclassified_and_undetected(clf, batch):
    x, y = batch  # all correctly classified
    det = ByMean(clf)
    det.threshold = float(x.flatten(1).mean(1).median())
    flagged = det.detect(x)
    assert 0 < int(flagged.sum()) < len(x)
    wrong = (y + 1) % 10
    # correctly classified: never a success, detected or not
    assert not bool(adaptive_success(clf, det, x, y).any())
    # misclassified (the "true" labels are wrong): a success exactly where not flagged
    assert torch.equal(adaptive_success(clf, det, x, wrong), ~flagged)


def test_detector_aware_adds_a_class_that_wins_exactly_when_detected(clf, trained_mlp, mnist_test):
    x = mnist_test[0][:64]
    det = ByMean(clf)
    det.threshold = float(x.flatten(1).mean(1).median())
    combined = DetectorAware(clf, det)
    z = combined(x)
    assert z.shape == (64, 11) and combined.num_classes == 11  # known once the model has answered
    with torch.no_grad():
        assert torch.allclose(z[:, :10], trained_mlp(x), atol=1e-5)
    assert torch.equal(z.argmax(1) == 10, det.detect(x))
    assert torch.equal(z[:, :10].argmax(1), clf.predict(x))


def test_detector_aware_is_differentiable_through_the_squeezers(clf, batch):
    x, y = batch
    fs = FeatureSqueezing(clf).calibrate(
        advx.data.load("mnist-demo", split="test")[0][:200], fpr=0.05
    )
    extra_logit = lambda z, _: z[:, 10]

    def grad(model):
        view = advx.models.ModelView(model, advx.models.Tracker(len(x), x.device))
        with model.prepared():
            return view.value_and_grad(x, extra_logit, y)[1]

    g_bpda = grad(DetectorAware(clf, fs))
    g_raw = grad(DetectorAware(clf, fs, bpda=False))
    # the detection logit depends on the squeezed branches; BPDA lets their gradient through
    assert bool((g_bpda.flatten(1).abs().amax(1) > 0).all())
    assert float((g_bpda - g_raw).abs().max()) > 0


def test_an_adaptive_attack_evades_more_often_than_a_plain_one(clf, mnist_test, batch):
    x, y = batch
    fs = FeatureSqueezing(clf).calibrate(mnist_test[0][:500], fpr=0.05)
    plain = advx.PGD(advx.Linf(0.3), steps=20)(clf, x, y)
    with torch.no_grad():
        target = (
            clf(x).scatter(1, y.view(-1, 1), float("-inf")).argmax(1)
        )  # most likely other class
    adaptive = advx.PGD(advx.Linf(0.3), steps=20, loss="margin")(
        DetectorAware(clf, fs), x, y, target=target
    )
    ok_plain = adaptive_success(clf, fs, plain.x_adv, y)
    ok_adaptive = adaptive_success(clf, fs, adaptive.x_adv, y)
    # the attack's own verdict on the combined model is the adaptive success
    assert torch.equal(adaptive.success, ok_adaptive)
    assert ok_adaptive.float().mean() > ok_plain.float().mean()


def test_ensemble_disagreement_detector(clf, mnist_test):
    x, _ = mnist_test
    torch.manual_seed(3)
    other = advx.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    ens = Ensemble([clf, other])
    det = EnsembleDisagreement(ens).calibrate(x[:200], fpr=0.1)
    assert torch.allclose(det.score(x[:50]), ens.disagreement(x[:50]))
    assert abs(float(det.detect(x[200:400]).float().mean()) - 0.1) < 0.07
    with pytest.raises(InputError, match="Ensemble"):
        EnsembleDisagreement(clf)
    assert DetectorAware(ens, det).num_classes == 11
