"""Classifier: normalization inside, output adapters, mode and state restored, counting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import advx
from advx.attacks import _lanes
from advx.errors import BudgetExceeded, InputError

from ..conftest import CountingNet


class Heads(nn.Module):
    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        z = self.net(x)
        if self.kind == "dict":
            return {"features": x.flatten(1), "out": z}
        if self.kind == "tuple":
            return (x.flatten(1), z)
        if self.kind == "object":
            return SimpleNamespace(logits=z)
        if self.kind == "probs":
            return z.softmax(dim=1)
        return z


def test_normalization_happens_inside(trained_mlp, batch):
    x, _ = batch
    mean, std = 0.2, 0.5
    clf = advx.Classifier(trained_mlp, mean=[mean], std=[std])
    with torch.no_grad():
        assert torch.allclose(clf(x), trained_mlp((x - mean) / std), atol=1e-6)


@pytest.mark.parametrize(
    "kind,output",
    [
        ("dict", "out"),
        ("tuple", 1),
        ("object", None),
        ("plain", None),
        ("tuple", lambda out: out[1]),
    ],
)
def test_output_adapters(trained_mlp, batch, kind, output):
    x, y = batch
    clf = advx.Classifier(Heads(trained_mlp, kind), output=output)
    with torch.no_grad():
        assert torch.allclose(clf(x), trained_mlp(x))
    r = advx.PGD(advx.Linf(0.2), steps=5)(clf, x, y)
    assert r.success.float().mean() > 0.5


def test_an_unreadable_output_says_how_to_fix_it(trained_mlp, batch):
    x, _ = batch
    with pytest.raises(InputError, match="output="):
        advx.Classifier(Heads(trained_mlp, "tuple"))(x)


def test_probabilities_are_warned_about(trained_mlp, batch):
    x, y = batch
    with pytest.warns(UserWarning, match="probabilities"):
        advx.Classifier(Heads(trained_mlp, "probs"))(x)


def test_training_mode_is_used_as_eval_and_restored_with_one_warning(trained_mlp, batch):
    x, y = batch
    net = nn.Sequential(trained_mlp, nn.Dropout(0.9))
    net.train()
    trained_mlp.eval()  # a mixed state: each submodule gets its own mode back
    clf = advx.Classifier(net)
    with pytest.warns(UserWarning, match="training mode") as record:
        a = advx.PGD(advx.Linf(0.1), steps=3, random_start=False)(clf, x, y)
        b = advx.PGD(advx.Linf(0.1), steps=3, random_start=False)(clf, x, y)
    assert len([w for w in record if "training mode" in str(w.message)]) == 1
    assert torch.equal(a.x_adv, b.x_adv)  # dropout was off: deterministic
    assert net.training and net[1].training and not trained_mlp.training


def test_grad_mode_and_param_grads_are_untouched(trained_mlp, batch):
    x, y = batch
    # the session's shared model may carry gradients from another test's own backward pass:
    # start clean, so that any gradient found afterwards is the attack's
    for p in trained_mlp.parameters():
        p.grad = None
    with torch.no_grad():
        r = advx.PGD(advx.Linf(0.1), steps=3)(trained_mlp, x, y)
        assert not torch.is_grad_enabled()
    assert r.grads.sum() > 0
    assert all(p.grad is None for p in trained_mlp.parameters())


def test_float64_inputs_stay_float64(trained_mlp, batch):
    x, y = batch
    r = advx.PGD(advx.Linf(0.1), steps=3)(trained_mlp, x.double(), y)
    assert r.x_adv.dtype == torch.float64 and r.distance.dtype == torch.float64
    assert next(trained_mlp.parameters()).dtype == torch.float32  # the model was not converted


def test_budget_is_enforced_before_the_pass(trained_mlp, batch):
    x, y = batch
    clf = advx.Classifier(trained_mlp, budget=5)
    with pytest.raises(BudgetExceeded, match="budget of 5") as info:
        advx.PGD(advx.Linf(0.01), steps=10)(clf, x, y)
    assert int(info.value.queries.max()) <= 5
    assert info.value.partial is not None and len(info.value.partial) == len(x)
    ok = advx.FGSM(advx.Linf(0.01))(clf, x, y)  # 3 passes: clean, gradient, final check
    assert int(ok.queries.max()) <= 5


def test_chunked_passes_give_the_same_results_and_counts(trained_mlp, batch, monkeypatch):
    # counts the net's rows: eager compaction, whatever ADVX_COMPACT_EVERY says
    monkeypatch.setenv(_lanes.ENV, "1")
    x, y = batch
    net = CountingNet(trained_mlp).eval()
    whole = advx.PGD(advx.Linf(0.1), steps=5)(advx.Classifier(net, batch_size=1000), x, y)
    net.reset()
    parts = advx.PGD(advx.Linf(0.1), steps=5)(advx.Classifier(net, batch_size=5), x, y)
    assert torch.equal(whole.success, parts.success)
    assert torch.allclose(whole.x_adv, parts.x_adv, atol=1e-6)
    assert torch.equal(whole.queries, parts.queries)
    assert net.forward_rows == int(parts.queries.sum())


def test_automatic_chunk_size_is_measured_once_and_cached(trained_mlp, mnist_test):
    x, y = mnist_test
    clf = advx.Classifier(trained_mlp)
    advx.FGSM(advx.Linf(0.1))(clf, x[:200], y[:200])
    assert len(clf._tuned) == 2  # one size for forward passes, one for forward + backward
    sizes = dict(clf._tuned)
    advx.FGSM(advx.Linf(0.1))(clf, x[200:400], y[200:400])
    assert clf._tuned == sizes
    assert all(s >= 16 for s in sizes.values())


def test_constructor_errors_name_the_argument(trained_mlp):
    with pytest.raises(InputError, match="net"):
        advx.Classifier(lambda x: x)
    with pytest.raises(InputError, match="std"):
        advx.Classifier(trained_mlp, std=[0.0])
    with pytest.raises(InputError, match="budget"):
        advx.Classifier(trained_mlp, budget=0)
    # a bool is not a budget, on a Classifier as on a BlackBox (the checks are one function)
    with pytest.raises(InputError, match="budget must be a positive int or None, got True"):
        advx.Classifier(trained_mlp, budget=True)
    with pytest.raises(InputError, match="budget must be a positive int or None, got True"):
        advx.BlackBox(lambda x: x, budget=True)
    with pytest.raises(InputError, match="batch_size"):
        advx.Classifier(trained_mlp, batch_size=-3)
    with pytest.raises(InputError, match="channels"):
        advx.Classifier(trained_mlp, mean=[0.1, 0.2, 0.3], std=[1, 1, 1])(torch.rand(2, 1, 28, 28))
    with pytest.raises(InputError, match="autocast"):
        advx.Classifier(trained_mlp, autocast=torch.float64)
    with pytest.raises(InputError, match="compile"):
        advx.Classifier(trained_mlp, compile="yes")


def test_compile_runs_forward_passes_compiled_and_gradients_eagerly(trained_mlp, batch):
    """Compiled score passes give the eager results; gradient passes never go through the
    compiled module (its input gradients were found all zero after a recompilation)."""
    x, y = batch
    eager = advx.Classifier(trained_mlp)
    comp = advx.Classifier(trained_mlp, compile={"backend": "aot_eager"})
    calls = []
    real = comp._compiled_net

    def spy(xin):
        calls.append((tuple(xin.shape), torch.is_grad_enabled()))
        return real(xin)

    comp._compiled_net = spy
    for attack in (advx.Square(advx.Linf(0.1), queries=30), advx.PGD(advx.Linf(0.1), steps=5)):
        a, b = attack(eager, x, y), attack(comp, x, y)
        assert torch.equal(a.success, b.success) and torch.allclose(a.x_adv, b.x_adv, atol=1e-6)
        assert torch.equal(a.queries, b.queries)
    assert calls and not any(grad for _, grad in calls)
    assert comp.compile  # every shape it saw matched the eager model
    assert len({shape for shape, _ in calls}) > 1  # samples dropping out: several batch sizes


def test_a_compiled_model_that_disagrees_with_the_eager_one_is_dropped(trained_mlp, batch):
    x, _ = batch
    clf = advx.Classifier(trained_mlp, compile={"backend": "aot_eager"})
    clf._compiled = lambda inp: trained_mlp(inp) + 1.0  # a broken compiler
    with pytest.warns(UserWarning, match="differs from the eager"):
        out = clf(x)
    assert torch.allclose(out, trained_mlp(x)) and clf.compile is False


def test_chunk_size_is_measured_per_bucket_not_capped_at_the_first_batch(trained_mlp, mnist_test):
    """A first batch of 100 rows must not cap the chunks of a later batch of 1,000."""
    x, y = mnist_test
    clf = advx.Classifier(trained_mlp)
    small = clf.batch_size_for(x[:100], grad=False)
    assert small <= 128
    big = clf.batch_size_for(x[:1000], grad=False)
    keys = {k[-1] for k in clf._tuned}
    assert keys == {128, 1024}  # one measurement per bucket (next power of two)
    assert big in (16, 32, 64, 128, 256, 512, 1024)
    # a bucket between two measured ones reuses the larger one's choice, capped at its own size
    assert clf.batch_size_for(x[:300], grad=False) == min(big, 512)
    assert {k[-1] for k in clf._tuned} == {128, 1024}
