"""Checkpoints: what the sidecar records, atomic saves, exact resume, loading with advx.zoo.load."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

import advx
from advx import _checkpoint as ckpt
from advx.errors import InputError
from advx.training import Checkpointing, Monitor, Recipe, Schedule, fgsm_rs, fit, standard
from advx.zoo import build, load


@pytest.fixture(scope="module")
def data(mnist_train):
    x, y = mnist_train
    return x[:400], y[:400]


def lenet(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build("lenet", width=4)


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KW = dict(
    schedule=Schedule(epochs=3, lr=3e-3, lr_schedule="cyclic"),
    batch_size=50,
    seed=1,
    progress=False,
    monitor=Monitor(data=40),
)


def test_the_sidecar_says_what_made_the_weights_and_zoo_load_gives_a_ready_classifier(
    data, tmp_path
):
    x, y = data
    net = lenet()
    save = Checkpointing(tmp_path, data_name="mnist-demo:train[:400]")
    h = fit(net, x, y, loss=fgsm_rs(0.1), checkpoint=save, **KW)
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    assert side["schema"] == "advx-checkpoint/1"
    assert side["recipe"] == {"name": "fgsm_rs", "params": {"eps": 0.1, "alpha": 0.125}}
    assert side["threat"] == {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]}
    assert side["data"]["sha256"] == advx.data.data_sha256(x, y) and side["data"]["n"] == 400
    assert side["training"]["epochs_done"] == 3 and side["training"]["lr_schedule"] == "cyclic"
    assert side["metrics"] == h.epochs
    assert (
        side["versions"]["advx"] == advx.__version__
        and side["versions"]["torch"] == torch.__version__
    )
    assert side["model"]["spec"] == "lenet" and side["model"]["kwargs"]["width"] == 4
    assert h.checkpoint == str(tmp_path / "checkpoint.json")
    # only the current checkpoint's files are left, and the training curve beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.json", side["weights"], side["state"], "training-curve.png"]
    )

    for path in (tmp_path, tmp_path / "checkpoint.json", tmp_path / side["weights"]):
        clf = load(path)
        assert isinstance(clf, advx.Classifier) and not clf.net.training
        assert same(weights(clf.net), weights(net))
        assert torch.equal(clf(x[:20]), advx.Classifier(net.eval())(x[:20]))
    # the weights file alone carries the sidecar in its header
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "w.safetensors").write_bytes((tmp_path / side["weights"]).read_bytes())
    assert same(weights(load(alone / "w.safetensors").net), weights(net))


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(data, tmp_path):
    x, y = data
    fit(lenet(), x[:100], y[:100], batch_size=50, progress=False, checkpoint=tmp_path)
    with pytest.raises(InputError, match=r"does not fit SmallCNN: missing \['classifier.fc1.bias'"):
        load(tmp_path, model="smallcnn")
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(InputError, match=r"unexpected \['conv1.bias'"):
        load(tmp_path, model=other)


def test_a_changed_weights_file_is_refused(data, tmp_path):
    x, y = data
    fit(lenet(), x[:100], y[:100], batch_size=50, progress=False, checkpoint=tmp_path)
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    path = tmp_path / side["weights"]
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="does not match the sha256"):
        load(tmp_path)


def test_a_plain_module_needs_model_to_load(data, tmp_path):
    x, y = data
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    fit(net, x[:100], y[:100], batch_size=50, progress=False, checkpoint=tmp_path)
    with pytest.raises(InputError, match="pass model="):
        load(tmp_path)
    assert same(
        weights(load(tmp_path, model=nn.Sequential(nn.Flatten(), nn.Linear(784, 10))).net),
        weights(net),
    )


@pytest.mark.parametrize("where", ["weights", "state", "sidecar"])
def test_a_save_that_fails_halfway_leaves_the_previous_checkpoint_whole(
    data, tmp_path, monkeypatch, where
):
    x, y = data
    net = lenet()
    fit(net, x[:100], y[:100], batch_size=50, progress=False, checkpoint=tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    first = weights(net)

    real = ckpt.write_bytes
    target = {"weights": ".safetensors", "state": ".pt", "sidecar": ".json"}[where]

    def half_then_fail(path, data_bytes):
        if str(path).endswith(target):
            from advx._io import atomic_open

            with atomic_open(path, "wb") as f:
                f.write(data_bytes[: len(data_bytes) // 2])
                raise OSError("disk full (simulated)")
        return real(path, data_bytes)

    monkeypatch.setattr(ckpt, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        fit(
            net,
            x[:100],
            y[:100],
            schedule=Schedule(epochs=2),
            batch_size=50,
            progress=False,
            checkpoint=tmp_path,
        )
    monkeypatch.undo()
    leftovers = {p.name for p in tmp_path.iterdir()} - set(before)
    assert not any(name.endswith(".tmp") for name in leftovers)  # no temporary file left behind
    assert before["checkpoint.json"] == (tmp_path / "checkpoint.json").read_bytes()
    assert same(weights(load(tmp_path).net), first)


def test_fsync_failing_leaves_the_previous_checkpoint_whole(data, tmp_path, monkeypatch):
    x, y = data
    net = lenet()
    fit(net, x[:100], y[:100], batch_size=50, progress=False, checkpoint=tmp_path)
    first = weights(net)
    import advx._io as io_mod

    def broken(fd):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(io_mod.os, "fsync", broken)
    with pytest.raises(OSError, match="simulated"):
        fit(
            net,
            x[:100],
            y[:100],
            schedule=Schedule(epochs=2),
            batch_size=50,
            progress=False,
            checkpoint=tmp_path,
        )
    monkeypatch.undo()
    assert same(weights(load(tmp_path).net), first)


class Interrupted(Exception):
    pass


def _killed_at(recipe: Recipe, epoch: int) -> Recipe:
    """The same recipe, dying at the first batch of ``epoch`` (0-based) like a killed process."""

    def run(b):
        if b.epoch == epoch:
            raise Interrupted
        return recipe(b)

    return Recipe(recipe.name, recipe.params, run, recipe.threat, recipe.overfit_check)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_run_killed_after_epoch_k_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(
    data, tmp_path, optimizer
):
    x, y = data
    kw = {**KW, "schedule": replace(KW["schedule"], optimizer=optimizer)}
    whole = lenet()
    h_whole = fit(whole, x, y, loss=fgsm_rs(0.1), checkpoint=tmp_path / "a", **kw)

    part = lenet()
    with pytest.raises(Interrupted):
        fit(part, x, y, loss=_killed_at(fgsm_rs(0.1), 2), checkpoint=tmp_path / "b", **kw)
    side = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert side["training"]["epochs_done"] == 2
    fresh = lenet(seed=99)  # the resume restores the weights: the initial ones do not matter
    resume = Checkpointing(tmp_path / "b", resume=True)
    h = fit(fresh, x, y, loss=fgsm_rs(0.1), checkpoint=resume, **kw)
    assert h.resumed_from == 2 and len(h.epochs) == 3
    assert same(weights(fresh), weights(whole))
    for a, b in zip(h.epochs, h_whole.epochs):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    # resuming a finished run does nothing and keeps its weights
    again = lenet(seed=5)
    fit(again, x, y, loss=fgsm_rs(0.1), checkpoint=resume, **kw)
    assert same(weights(again), weights(whole))


def test_resume_with_other_settings_or_another_architecture_is_refused(data, tmp_path):
    x, y = data
    kw = dict(batch_size=50, progress=False)
    fit(lenet(), x[:100], y[:100], loss=standard(), checkpoint=tmp_path, **kw)
    resume = Checkpointing(tmp_path, resume=True)
    with pytest.raises(InputError, match=r"other settings \(recipe, lr\)"):
        fit(
            lenet(),
            x[:100],
            y[:100],
            loss=fgsm_rs(0.1),
            schedule=Schedule(lr=0.01),
            checkpoint=resume,
            monitor=Monitor(data=None, overfit_check=False),
            **kw,
        )
    with pytest.raises(InputError, match=r"other settings \(data\)"):
        fit(lenet(), x[100:200], y[100:200], checkpoint=resume, **kw)
    with pytest.raises(InputError, match="does not fit SmallCNN"):
        fit(build("smallcnn"), x[:100], y[:100], checkpoint=resume, **kw)
    # a constant schedule may be extended
    h = fit(lenet(), x[:100], y[:100], schedule=Schedule(epochs=2), checkpoint=resume, **kw)
    assert h.resumed_from == 1 and len(h.epochs) == 2


def test_missing_safetensors_says_how_to_get_it(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    x, y = data
    with pytest.raises(InputError, match=r"pip install 'advx\[train\]'"):
        fit(lenet(), x[:100], y[:100], progress=False, checkpoint=tmp_path)


def test_wong_cnn_has_the_published_shape():
    net = build("wong_cnn")
    assert [tuple(p.shape) for p in net.parameters()] == [
        (16, 1, 4, 4),
        (16,),
        (32, 16, 4, 4),
        (32,),
        (100, 1568),
        (100,),
        (10, 100),
        (10,),
    ]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_wrapped_built_in_net_is_recorded_as_itself_and_loads_back(data, tmp_path):
    """A DataParallel (or torch.compile) wrapper around advx.zoo.nets.smallcnn(): the sidecar
    names smallcnn, the weights are saved without the wrapper's prefix, zoo.load rebuilds it."""
    x, y = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.nets.smallcnn()
    fit(nn.DataParallel(net), x[:100], y[:100], batch_size=50, progress=False, out=tmp_path)
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    assert side["model"]["spec"] == "smallcnn" and side["model"]["class"].endswith("SmallCNN")
    loaded = load(tmp_path).net
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
