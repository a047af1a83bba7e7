"""The fit loop: determinism, schedules, mixed precision, compile, NaN, catastrophic overfitting."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advx
from advx.errors import InputError
from advx.training import (
    Checkpointing,
    Monitor,
    Precision,
    Recipe,
    Schedule,
    Step,
    TrainingError,
    fgsm_rs,
    fit,
    lr_at,
    standard,
)


def mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def small(mnist_train):
    x, y = mnist_train
    return x[:600], y[:600]


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def recording(inner: Recipe, log: list) -> Recipe:
    def run(b):
        log.append((b.epoch, b.index.clone()))
        return inner(b)

    return Recipe(inner.name, inner.params, run, inner.threat, inner.overfit_check)


def test_same_seed_same_weights_bit_for_bit_and_the_callers_rng_is_left_alone(small):
    x, y = small
    kw = dict(
        loss=fgsm_rs(0.1),
        schedule=Schedule(epochs=2, lr=2e-3, lr_schedule="cyclic"),
        batch_size=64,
        seed=3,
        progress=False,
    )
    a, b, c = mlp(), mlp(), mlp()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fit(a, x, y, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    fit(b, x, y, **kw)
    fit(c, x, y, **{**kw, "seed": 4})
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


def test_every_training_sample_is_seen_once_per_epoch_and_the_monitor_is_held_out(small):
    x, y = small
    log: list = []
    h = fit(
        mlp(),
        x,
        y,
        loss=recording(fgsm_rs(0.1), log),
        schedule=Schedule(epochs=2),
        batch_size=50,
        progress=False,
        monitor=Monitor(data=40),
    )
    for e in (0, 1):
        seen = torch.cat([i for ep, i in log if ep == e]).sort().values
        assert seen.numel() == 560 and seen.unique().numel() == 560
    held = set(range(600)) - set(seen.tolist())
    assert len(held) == 40
    orders = [torch.cat([i for ep, i in log if ep == e]) for e in (0, 1)]
    assert not torch.equal(orders[0], orders[1])  # reshuffled every epoch
    row = h.epochs[-1]
    assert set(row) >= {
        "epoch",
        "lr",
        "loss",
        "train_clean_accuracy",
        "train_adv_accuracy",
        "monitor_clean_accuracy",
        "monitor_adv_accuracy",
        "seconds",
    }
    assert 0 <= row["monitor_adv_accuracy"] <= row["monitor_clean_accuracy"] <= 1


def test_lr_schedules():
    # Wong et al.'s triangle: 0 -> lr at 2/5 of the epochs -> 0
    assert lr_at("cyclic", 0.1, 0.0, 10) == 0.0
    assert lr_at("cyclic", 0.1, 2.0, 10) == pytest.approx(0.05)
    assert lr_at("cyclic", 0.1, 4.0, 10) == pytest.approx(0.1)
    assert lr_at("cyclic", 0.1, 7.0, 10) == pytest.approx(0.05)
    assert lr_at("cyclic", 0.1, 10.0, 10) == pytest.approx(0.0)
    # multistep: x0.1 from the start of epoch 5 (0-based) and again from epoch 7
    # the last batch of epoch 4
    assert lr_at("multistep", 0.1, 5.0, 10, (5, 7)) == pytest.approx(0.1)
    assert lr_at("multistep", 0.1, 5.01, 10, (5, 7)) == pytest.approx(0.01)
    assert lr_at("multistep", 0.1, 8.0, 10, (5, 7)) == pytest.approx(0.001)
    assert lr_at("constant", 0.1, 8.0, 10) == 0.1
    # a Schedule's default milestones: half and three quarters of the epochs
    s = Schedule(epochs=8, lr=0.1, lr_schedule="multistep")
    assert s.milestone_epochs == (4, 6) and s.lr_at(5.5) == pytest.approx(0.01)
    assert Schedule(lr_schedule="multistep", milestones=[2]).milestones == (2,)


def test_the_history_records_the_schedule(small):
    x, y = small
    h = fit(
        mlp(),
        x,
        y,
        schedule=Schedule(epochs=4, lr=0.01, optimizer="sgd", lr_schedule="multistep"),
        batch_size=100,
        progress=False,
    )
    assert [r["lr"] for r in h.epochs] == pytest.approx([0.01, 0.01, 0.001, 0.0001])


def _accuracy(net, x, y):
    return advx.Classifier(net).accuracy(x, y)


def _autocast_works(dtype: torch.dtype) -> str | None:
    """None when this CPU build runs a linear layer's forward and backward under autocast at
    ``dtype``, else why not: the feature fit relies on, probed without fit."""
    try:
        layer = nn.Linear(4, 2)
        with torch.autocast("cpu", dtype=dtype):
            out = layer(torch.rand(3, 4))
        out.float().sum().backward()
    except RuntimeError as e:  # pragma: no cover - depends on the CPU build
        return str(e)
    return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_reaches_the_accuracy_of_fp32(mnist_train, mnist_test, dtype):
    why = _autocast_works(dtype)
    if why is not None:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"this CPU build has no {dtype} autocast: {why}")
    x, y = mnist_train
    xt, yt = mnist_test
    kw = dict(schedule=Schedule(epochs=2, lr=3e-3), batch_size=64, progress=False)
    ref = mlp()
    fit(ref, x[:1500], y[:1500], **kw)
    low = mlp()
    fit(low, x[:1500], y[:1500], precision=Precision(autocast=dtype), **kw)
    a, b = _accuracy(ref, xt[:500], yt[:500]), _accuracy(low, xt[:500], yt[:500])
    assert a > 0.8 and abs(a - b) < 0.03, (a, b)
    assert not same(weights(ref), weights(low))  # it did run in lower precision


def smallcnn(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = advx.zoo.build("smallcnn")
    for m in net.modules():
        if isinstance(m, nn.Dropout):  # compiled dropout draws other random numbers than eager
            m.p = 0.0
    return net


def _compile_works(backend: bool | str) -> str | None:
    """None when torch.compile with ``backend`` trains a linear layer here, else why not: the
    feature fit relies on, probed without fit, so that a broken fit fails instead of skipping."""
    opts = {} if backend is True else {"backend": backend}
    try:
        layer = nn.Linear(4, 2)
        torch.compile(layer, **opts)(torch.rand(3, 4)).sum().backward()
    except Exception as e:  # pragma: no cover - depends on the CPU build and its compiler
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        torch._dynamo.reset()
    return None


def _compiled_matches(small, backend, make=mlp, atol=1e-4, schedule=None, **kw):
    why = _compile_works(backend)
    if why is not None:  # pragma: no cover - depends on the CPU build and its compiler
        pytest.skip(f"torch.compile(backend={backend!r}) does not work on this build: {why}")
    x, y = small
    x, y = x[:550], y[:550]  # a short last batch: the compiled module must only see full ones
    ref, comp = make(), make()
    kw = {
        "schedule": schedule or Schedule(epochs=1, lr=3e-3),
        "batch_size": 100,
        "progress": False,
        **kw,
    }
    fit(ref, x, y, **kw)
    fit(comp, x, y, precision=Precision(compile=backend), **kw)
    for k, v in weights(ref).items():
        assert torch.allclose(v, comp.state_dict()[k], atol=atol), (
            k,
            float((v - comp.state_dict()[k]).abs().max()),
        )


def test_compile_traces_the_loop(small):
    """Dynamo's tracing with the aot_eager backend: the plumbing, in seconds."""
    _compiled_matches(small, "aot_eager")


def test_the_compiled_module_sees_only_full_batches(small):
    """The inductor workaround, checked directly (the numerical symptom it guards against does
    not show on every build): a backend that records each graph's input shapes sees the batch
    size only, never the short last batch, which runs eagerly."""
    from torch._dynamo import register_backend

    seen: list[int] = []

    def recording(gm, example_inputs):
        seen.extend(int(t.shape[0]) for t in example_inputs if t.dim() == 4)
        return gm.forward

    name = "advx_test_recording"
    register_backend(recording, name=name)
    x, y = small
    try:
        fit(
            mlp(),
            x[:550],
            y[:550],
            batch_size=100,
            precision=Precision(compile=name),
            schedule=Schedule(epochs=1, lr=3e-3),
            progress=False,
        )
    finally:
        torch._dynamo.reset()
    assert seen and set(seen) == {100}, seen


@pytest.mark.slow
def test_compile_with_inductor(small):
    """compile=True (inductor: generates and compiles C++; about a minute on two busy cores).
    The SmallCNN and the short last batch matter: torch 2.13's inductor gave this net all-zero
    gradients (on one thread) once it had recompiled for a second batch size, which fit must
    never let happen."""
    # FGSM-RS crafts with input gradients, the ones that went to zero; SGD, because Adam turns
    # the last bits of rounding noise in near-zero gradients into full-size steps
    # (measured: 2e-5 apart with the fix, 2e-3 without it). One thread: the broken kernels were
    # the single-threaded ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compiled_matches(
            small,
            True,
            make=smallcnn,
            atol=5e-4,
            loss=fgsm_rs(0.3),
            monitor=Monitor(data=None, overfit_check=False),
            schedule=Schedule(epochs=2, optimizer="sgd", lr=0.05),
        )
    finally:
        torch.set_num_threads(threads)


def test_a_nan_loss_stops_naming_the_epoch_and_batch_and_keeps_the_last_good_checkpoint(
    small, tmp_path
):
    x, y = small
    inner = standard()

    def run(b):
        step = inner(b)
        if b.epoch == 1 and calls.append(1) is None and len(calls) == 3:
            return Step(step.loss * math.nan, logits=step.logits)
        return step

    calls: list = []
    net = mlp()
    with pytest.raises(TrainingError, match=r"epoch 2, batch 3 of 6") as err:
        fit(
            net,
            x,
            y,
            loss=Recipe("standard", inner.params, run),
            schedule=Schedule(epochs=3),
            batch_size=100,
            progress=False,
            checkpoint=Checkpointing(tmp_path),
        )
    assert len(err.value.history.epochs) == 1 and "nan" in err.value.history.stopped
    saved = advx.zoo.load(tmp_path, model=mlp())
    assert same(weights(net), weights(saved.net))  # the model holds the checkpoint's weights
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def test_catastrophic_overfitting_rolls_back_to_the_best_epoch_and_stops(mnist_train, tmp_path):
    """From epoch 3 on the recipe trains on wrong labels: the monitor's PGD accuracy collapses,
    and fit must notice, restore epoch 2's weights and stop."""
    x, y = mnist_train[0][:1200], mnist_train[1][:1200]
    good = fgsm_rs(0.02)

    def run(b):
        if b.epoch >= 2:
            logits = b.model(b.x)
            return Step(F.cross_entropy(logits, (b.y + 1) % 10, reduction="none"), logits=logits)
        return good(b)

    recipe = Recipe("fgsm_rs", good.params, run, good.threat, overfit_check=True)
    kw = dict(loss=recipe, batch_size=50, progress=False)
    watch = Monitor(data=100)
    net = mlp()
    h = fit(
        net, x, y, schedule=Schedule(epochs=6, lr=1e-2), monitor=watch, checkpoint=tmp_path, **kw
    )
    assert h.stopped and "catastrophic overfitting at epoch 3" in h.stopped, h.stopped
    assert h.best_epoch == 2 and len(h.epochs) == 3
    accs = [r["monitor_adv_accuracy"] for r in h.epochs]
    assert accs[1] > 0.5 and accs[2] < accs[1] - 0.2
    # the same run stopped after two epochs (constant lr: the same first two epochs) has the
    # weights kept
    ref = mlp()
    no_check = Monitor(data=100, overfit_check=False)
    fit(ref, x, y, schedule=Schedule(epochs=2, lr=1e-2), monitor=no_check, **kw)
    assert same(weights(net), weights(ref))
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    assert side["training"]["stopped"] == h.stopped and side["training"]["best_epoch"] == 2
    assert same(weights(advx.zoo.load(tmp_path, model=mlp()).net), weights(ref))
    # a floor alone stops it too
    floor = Monitor(data=100, overfit_drop=1.0, overfit_floor=0.5)
    h = fit(mlp(), x, y, schedule=Schedule(epochs=6, lr=1e-2), monitor=floor, **kw)
    assert "epoch 3" in h.stopped and "under the floor of 50%" in h.stopped and h.best_epoch == 2


def test_a_plain_loss_function_still_works(small):
    x, y = small
    net = mlp()
    h = fit(
        net,
        x,
        y,
        loss=lambda m, xb, yb: F.cross_entropy(m(xb), yb),
        schedule=Schedule(epochs=2, lr=3e-3),
        batch_size=64,
        progress=False,
    )
    assert h.epochs[-1]["loss"] < h.epochs[0]["loss"]


def test_a_classifier_trains_through_its_normalization(small):
    x, y = small
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, t):
            seen.append(float(t.min()))
            return self.body(t)

    clf = advx.Classifier(Spy(), mean=(0.5,), std=(0.25,))
    fit(clf, x, y, batch_size=100, progress=False)
    assert min(seen) == pytest.approx(-2.0)


def test_bad_arguments_fail_before_training(small):
    x, y = small
    with pytest.raises(InputError, match="labels run from 0 to 9 but the model gives 5 classes"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)), x, y, progress=False)
    # the settings refuse a bad field when they are built, naming it
    for make, match in (
        (lambda: Schedule(optimizer="rmsprop"), "optimizer must be one of 'sgd', 'adam'"),
        (lambda: Schedule(lr_schedule="cosine"), "lr_schedule"),
        (lambda: Schedule(epochs=0), "epochs must be a positive int"),
        (lambda: Schedule(lr=-1.0), "lr must be"),
        (lambda: Schedule(momentum=1.0), "momentum must be"),
        (lambda: Schedule(weight_decay=-1e-4), "weight_decay must be"),
        (lambda: Precision(autocast=torch.float64), "autocast"),
        (lambda: Precision(compile=1), "compile"),
        (lambda: Monitor(steps=0), "monitor_steps"),
        (lambda: Monitor(overfit_drop=-0.1), "overfit_drop"),
        (lambda: Checkpointing("runs/a", resume="yes"), "resume must be True or False"),
    ):
        with pytest.raises(InputError, match=match):
            make()
    for kw, match in (
        ({"monitor": 600}, "monitor"),
        ({"monitor": Monitor(data=600)}, "monitor"),
        ({"loss": standard(), "monitor": Monitor(overfit_check=True)}, "threat"),
        ({"schedule": {"epochs": 2}}, "schedule must be an advx.training.Schedule"),
        ({"checkpoint": 3}, "checkpoint must be"),
        # the flat shorthand is checked by the same settings
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"autocast": torch.float64}, "autocast"),
        ({"loss": standard(), "overfit_check": True}, "threat"),
    ):
        with pytest.raises(InputError, match=match):
            fit(mlp(), x, y, progress=False, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        fit(mlp(), x, y, progress=False, epoch=3)
    with pytest.raises(InputError, match=r"expected x in \[0, 1\]"):
        fit(mlp(), x * 255, y, progress=False)


def test_the_flat_shorthand_trains_what_the_settings_do(small, tmp_path):
    """``epochs=2, lr=..., out=...`` is the same run as the settings spelled out; a flat field
    overrides the one of a setting passed beside it."""
    x, y = small[0][:300], small[1][:300]
    a, b, c = mlp(), mlp(), mlp()
    grouped = fit(
        a,
        x,
        y,
        loss=fgsm_rs(0.1),
        schedule=Schedule(epochs=2, lr=5e-3, optimizer="sgd", lr_schedule="cyclic"),
        batch_size=50,
        seed=2,
        monitor=Monitor(data=30, steps=3),
        checkpoint=Checkpointing(tmp_path / "a", data_name="digits"),
        progress=False,
    )
    flat = fit(
        b,
        x,
        y,
        loss=fgsm_rs(0.1),
        epochs=2,
        lr=5e-3,
        optimizer="sgd",
        lr_schedule="cyclic",
        batch_size=50,
        seed=2,
        monitor=30,
        monitor_steps=3,
        out=tmp_path / "b",
        data_name="digits",
        progress=False,
    )
    assert same(weights(a), weights(b))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h.epochs]
    assert strip(grouped) == strip(flat)
    side = [json.loads((tmp_path / d / "checkpoint.json").read_text()) for d in "ab"]
    assert side[0]["training"] | {"seconds": 0} == side[1]["training"] | {"seconds": 0}
    assert side[0]["data"]["name"] == "digits"
    # a flat field wins over the setting's
    fit(
        c,
        x,
        y,
        loss=fgsm_rs(0.1),
        schedule=Schedule(epochs=1, lr=5e-3, optimizer="sgd", lr_schedule="cyclic"),
        epochs=2,
        batch_size=50,
        seed=2,
        monitor=Monitor(data=30, steps=3),
        progress=False,
    )
    assert same(weights(a), weights(c))


def test_the_progress_bar_shows_loss_and_accuracies(small, monkeypatch, capsys):
    x, y = small
    monkeypatch.setenv("ADVX_PROGRESS", "1")
    fit(
        mlp(),
        x[:200],
        y[:200],
        loss=fgsm_rs(0.1),
        batch_size=50,
        progress=True,
        monitor=Monitor(data=20),
    )
    err = capsys.readouterr().err
    assert "loss=" in err and "clean=" in err and "adv=" in err and "monitor PGD" in err
