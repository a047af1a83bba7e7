"""Input transforms: their forward passes, BPDA, and the wrapper's contract (bounds, counts,
dtype, state)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import advx
from advx.defenses import (
    JPEG,
    BitDepth,
    MedianSmoothing,
    Transformed,
    bit_depth,
    median_smooth,
    straight_through,
)
from advx.errors import AccessError, InputError

from ..conftest import CountingNet


# ---- forward passes ------------------------------------------------------------------------------
def test_bit_depth_rounds_to_evenly_spaced_levels():
    x = torch.linspace(0, 1, 101)
    for bits in (1, 2, 3):
        levels = torch.unique(bit_depth(x, bits))
        assert torch.allclose(levels, torch.linspace(0, 1, 2**bits), atol=1e-6)
    assert torch.equal(
        bit_depth(torch.tensor([0.2, 0.49, 0.51, 0.9]), 1), torch.tensor([0.0, 0.0, 1.0, 1.0])
    )
    # within the model's bounds, not a hard-coded [0, 1]
    out = bit_depth(torch.tensor([-1.0, -0.1, 0.4, 1.0]), 1, bounds=(-1.0, 1.0))
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert torch.allclose(
        bit_depth(torch.tensor([0.0, 60.0, 200.0, 255.0]), 2, (0.0, 255.0)),
        torch.tensor([0.0, 85.0, 170.0, 255.0]),
    )


def test_bitdepth_wrapper_uses_the_models_bounds(trained_mlp):
    clf = advx.Classifier(trained_mlp, bounds=(0.0, 255.0), mean=[0.0], std=[255.0])
    m = BitDepth(clf, 1)
    assert m.bounds == (0.0, 255.0)
    x = torch.full((2, 1, 28, 28), 100.0)
    x[1] = 200.0
    with torch.no_grad():
        assert torch.allclose(
            m(x),
            trained_mlp(torch.stack([torch.zeros(1, 28, 28), torch.ones(1, 28, 28)])),
            atol=1e-5,
        )


def test_median_on_a_hand_made_image():
    img = (torch.arange(1, 10, dtype=torch.float32) / 10).view(1, 1, 3, 3)  # 0.1 .. 0.9
    # 2x2: the extra row/column of the window is above/left, edges repeated; upper middle value
    expect2 = torch.tensor([[1, 2, 3], [4, 4, 5], [7, 7, 8]], dtype=torch.float32) / 10
    assert torch.allclose(median_smooth(img, 2)[0, 0], expect2)
    out3 = median_smooth(img, 3)[0, 0]
    assert (
        out3[1, 1] == pytest.approx(0.5)
        and out3[0, 0] == pytest.approx(0.2)
        and out3[0, 1] == pytest.approx(0.3)
    )
    # each channel on its own
    two = torch.cat([img, 1 - img], dim=1)
    assert torch.allclose(median_smooth(two, 2)[0, 1], median_smooth(1 - img, 2)[0, 0])


def test_median_matches_the_reference_scipy_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for size in (2, 3):
        ref = ndimage.median_filter(x.numpy(), size=(1, 1, size, size), mode="reflect")
        assert torch.equal(median_smooth(x, size), torch.from_numpy(ref))


def test_jpeg_round_trip_changes_the_image_a_little(mnist_test, trained_mlp):
    pytest.importorskip("PIL")
    x = mnist_test[0][:8]
    m = JPEG(advx.Classifier(trained_mlp), quality=75)
    out = m.fn(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    diff = (out - x).abs()
    assert 0 < float(diff.mean()) < 0.05  # changed, but a digit is still a digit
    assert float(diff.max()) > 0.05
    low = JPEG(advx.Classifier(trained_mlp), quality=10).fn(x)
    assert float((low - x).abs().mean()) > float(diff.mean())  # lower quality, larger change
    with torch.no_grad():
        assert (m(x).argmax(1) == trained_mlp(x).argmax(1)).float().mean() >= 0.75


def test_jpeg_without_pillow_says_what_to_install(trained_mlp, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(InputError, match=r"pip install 'advx\[image\]'"):
        JPEG(advx.Classifier(trained_mlp))


def test_bad_arguments_are_named(clf):
    with pytest.raises(InputError, match="bits"):
        BitDepth(clf, 0)
    with pytest.raises(InputError, match="size"):
        MedianSmoothing(clf, 1)
    with pytest.raises(InputError, match="fn"):
        Transformed(clf, "bits")
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        MedianSmoothing(clf, 2)(torch.rand(3, 784))


# ---- BPDA --------------------------------------------------------------------------------------
def test_straight_through_is_the_identity_backwards():
    x = torch.rand(4, 5, requires_grad=True)
    out = straight_through(torch.round, x)
    assert torch.equal(out, torch.round(x.detach()))
    (g,) = torch.autograd.grad((out * torch.arange(5.0)).sum(), x)
    assert torch.equal(g, torch.arange(5.0).expand(4, 5))


@pytest.mark.parametrize(
    "make",
    [lambda c, b: BitDepth(c, 1, bpda=b), lambda c, b: JPEG(c, 75, bpda=b)],
    ids=["bitdepth", "jpeg"],
)
def test_bpda_gives_a_gradient_where_the_raw_transform_gives_none(clf, batch, make):
    pytest.importorskip("PIL")
    x, y = batch
    view = lambda m: advx.models.ModelView(m, advx.models.Tracker(len(x), x.device))
    ce = advx.attacks._losses.ce
    with clf.prepared():
        _, g_bpda, _ = view(make(clf, True)).value_and_grad(x, ce, y)
        _, g_raw, z_raw = view(make(clf, False)).value_and_grad(x, ce, y)
    assert bool((g_bpda.flatten(1).abs().amax(1) > 0).all())
    assert float(g_raw.abs().max()) == 0.0
    # BPDA's gradient is the model's gradient at the transformed point
    m = make(clf, True)
    xt = m.fn(x)
    with clf.prepared():
        _, g_at, z_at = view(clf).value_and_grad(xt, ce, y)
    assert torch.allclose(g_bpda, g_at, atol=1e-6) and torch.allclose(z_raw, z_at, atol=1e-5)


def test_median_gradient_torch_or_bpda(clf, batch):
    x, y = batch
    view = lambda m: advx.models.ModelView(m, advx.models.Tracker(len(x), x.device))
    ce = advx.attacks._losses.ce
    with clf.prepared():
        _, g_torch, _ = view(MedianSmoothing(clf, 2, bpda=False)).value_and_grad(x, ce, y)
        _, g_bpda, _ = view(MedianSmoothing(clf, 2)).value_and_grad(x, ce, y)
    # torch's gradient only reaches the pixels a window selected; BPDA reaches every pixel
    reached = lambda g: float((g != 0).float().mean())
    assert 0 < reached(g_torch) < reached(g_bpda)


def test_pgd_through_bit_depth_needs_bpda(clf, batch):
    x, y = batch
    attack = advx.PGD(advx.Linf(0.3), steps=20)
    with_bpda = attack(BitDepth(clf, 1), x, y).success.float().mean()
    without = attack(BitDepth(clf, 1, bpda=False), x, y).success.float().mean()
    assert with_bpda >= 0.4
    assert without <= 0.1 and with_bpda >= without + 0.3


def test_the_audit_flags_bit_depth_without_bpda(clf, mnist_test):
    x, y = mnist_test[0][:40], mnist_test[1][:40]
    suite = [advx.PGD(advx.Linf(0.3), steps=10)]
    masked = advx.audit(
        BitDepth(clf, 1, bpda=False), x, y, advx.Linf(0.3), suite=suite, eps_curve=[0.3]
    )
    codes = {f.code for f in masked.findings}
    assert codes & {"masked-gradients", "large-eps-not-zero"}, codes
    assert not masked.to_dict()["reliable"]
    fair = advx.audit(BitDepth(clf, 1), x, y, advx.Linf(0.3), suite=suite, eps_curve=None)
    assert "masked-gradients" not in {f.code for f in fair.findings}
    assert fair.robust_accuracy < masked.robust_accuracy


# ---- the wrapper's contract -------------------------------------------------------------------
def test_wrapper_keeps_bounds_and_counts_every_pass(trained_mlp, batch):
    x, y = batch
    net = CountingNet(trained_mlp)
    m = BitDepth(advx.Classifier(net, bounds=(0.0, 1.0)), 2)
    assert m.bounds == (0.0, 1.0) and m.access == "gradients"
    r = advx.PGD(advx.Linf(0.1), steps=5, early_stop=False)(m, x, y)
    assert net.forward_rows == int(r.queries.sum()) and net.backward_rows == int(r.grads.sum())
    assert bool((r.grads == 5).all())


def test_wrapper_follows_the_callers_dtype(clf, batch):
    x, y = batch
    for m in (BitDepth(clf, 3), MedianSmoothing(clf, 2)):
        with torch.no_grad():
            z64 = m(x.double())
        assert z64.dtype == torch.float64
        r = advx.PGD(advx.Linf(0.1), steps=3)(m, x.double(), y)
        assert r.x_adv.dtype == torch.float64


def test_wrapper_restores_the_wrapped_models_state(batch):
    x, y = batch
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 32), nn.Dropout(0.5), nn.Linear(32, 10)
    ).train()
    m = BitDepth(advx.Classifier(net), 4)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)  # eval mode inside: dropout off
    advx.PGD(advx.Linf(0.1), steps=2)(m, x, y)
    assert net.training and all(mod.training for mod in net.modules())


def test_transformed_with_a_differentiable_fn_uses_its_gradient(clf, batch):
    x, y = batch
    flip = Transformed(clf, lambda t: 1 - t, differentiable=True)
    view = advx.models.ModelView(flip, advx.models.Tracker(len(x), x.device))
    with clf.prepared():
        _, g, _ = view.value_and_grad(x, advx.attacks._losses.ce, y)
        _, g0, _ = advx.models.ModelView(clf, advx.models.Tracker(len(x), x.device)).value_and_grad(
            1 - x, advx.attacks._losses.ce, y
        )
    assert torch.allclose(g, -g0, atol=1e-6)


def test_a_label_only_model_stays_label_only(clf, batch):
    x, y = batch
    m = BitDepth(clf.as_blackbox("labels"), 4)
    assert m.access == "labels"
    assert torch.equal(m.predict(x), clf.predict(bit_depth(x, 4)))
    with pytest.raises(AccessError):
        advx.PGD(advx.Linf(0.1), steps=2)(m, x, y)
