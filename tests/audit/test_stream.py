"""The audit over data as users hold it: tensors, a Dataset, a DataLoader, in any batch size,
give the same per-sample results; memory holds chunks, the examples go to a file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import advx
from advx.audit.adversarial import AdversarialExamples
from advx.errors import InputError

EPS = 0.1


def suite():
    # a gated last stage: the margins and the threshold must agree across the inputs too
    return [
        advx.FGSM(advx.Linf(EPS)),
        {"name": "pgd", "steps": 5, "loss": "margin", "closest": 0.5},
    ]


@pytest.fixture(scope="module")
def data(mnist_test):
    x, y = mnist_test
    return x[:90], y[:90]


KW = dict(suite=suite(), eps_curve=None, checks=False)


@pytest.fixture(scope="module")
def reference(trained_mlp, data):
    x, y = data
    return advx.audit(trained_mlp, x, y, advx.Linf(EPS), batch_size=500, **KW)


class Pairs(Dataset):
    """A plain map-style dataset: one (image, int label) per index, no batched fetch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("bs", [1, 37, 256])
def test_tensor_dataset_and_loader_give_the_same_per_sample_results(
    trained_mlp, data, reference, bs
):
    x, y = data
    assert 0 < reference.robust_accuracy < reference.clean_accuracy  # something to tell apart
    as_tensors = advx.audit(trained_mlp, x, y, advx.Linf(EPS), batch_size=bs, **KW)
    as_dataset = advx.audit(trained_mlp, Pairs(x, y), advx.Linf(EPS), batch_size=bs, **KW)
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)
    as_loader = advx.audit(trained_mlp, loader, advx.Linf(EPS), batch_size=37, **KW)
    for r in (as_tensors, as_dataset, as_loader):
        assert r.samples == reference.samples
        assert r.data.sha256 == reference.data.sha256 and r.data.n == len(y)
        assert [s.broke for s in r.cascade] == [s.broke for s in reference.cascade]


def test_a_loader_audit_with_checks_and_curve_matches_the_tensor_one(trained_mlp, data):
    x, y = data
    kw = dict(suite=suite(), eps_curve=[0.05, 0.1], subset=40, batch_size=32)
    a = advx.audit(trained_mlp, x, y, advx.Linf(EPS), **kw)
    b = advx.audit(
        trained_mlp, DataLoader(TensorDataset(x, y), batch_size=16), advx.Linf(EPS), **kw
    )
    assert a.samples == b.samples and a.eps_curve == b.eps_curve
    assert a.findings == b.findings
    assert [e.clean for e in a.examples] == [e.clean for e in b.examples]
    assert [e.adversarial for e in a.examples] == [e.adversarial for e in b.examples]


def test_a_loader_audit_resumes_to_the_same_result(trained_mlp, data, reference, tmp_path):
    x, y = data
    state = tmp_path / "state.pt"
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    from advx.audit import runner

    original = runner.Attack.__call__
    calls = {"n": 0}
    saving, runner.SAVE_EVERY_S = runner.SAVE_EVERY_S, 0.0  # the state after every chunk

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    runner.Attack.__call__ = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            advx.audit(trained_mlp, loader, advx.Linf(EPS), state=state, batch_size=25, **KW)
    finally:
        runner.Attack.__call__ = original
        runner.SAVE_EVERY_S = saving
    assert state.exists() and (tmp_path / "state.pt.adv").exists()
    resumed = advx.audit(
        trained_mlp, loader, advx.Linf(EPS), state=state, batch_size=25, return_adv=True, **KW
    )
    assert resumed.samples == reference.samples
    # the examples written before the kill are read back right after the resume
    adv = resumed.adversarial
    with torch.no_grad():
        assert torch.equal(trained_mlp(adv.x_adv).argmax(1), adv.pred)
    assert (adv.x_adv - x[adv.index]).abs().amax() <= EPS + 1e-6


def test_save_adv_streams_the_same_file_return_adv_keeps(trained_mlp, data, tmp_path):
    x, y = data
    names = [f"img{i:03d}.png" for i in range(len(y))]
    src = advx.data.as_source(x, y, names=names)
    r = advx.audit(
        trained_mlp, src, advx.Linf(EPS), save_adv=tmp_path / "a.npz", return_adv=True, **KW
    )
    back = AdversarialExamples.load(tmp_path / "a.npz")
    assert torch.equal(back.x_adv, r.adversarial.x_adv) and torch.equal(
        back.index, r.adversarial.index
    )
    assert back.names == [names[i] for i in back.index.tolist()] == r.adversarial.names
    assert torch.equal(back.pred, r.adversarial.pred) and back.meta == r.adversarial.meta
    only_file = advx.audit(trained_mlp, x, y, advx.Linf(EPS), save_adv=tmp_path / "b.npz", **KW)
    assert only_file.adversarial is None
    with np.load(tmp_path / "b.npz") as z:
        assert np.array_equal(z["x_adv"], back.x_adv.numpy())


def test_uint8_images_and_one_hot_labels_from_a_dataset_are_converted_with_a_warning(
    trained_mlp, data, reference
):
    x, y = data
    x8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(x8.float() / 255, x)  # MNIST is 8-bit: the scaling is exact
    onehot = torch.nn.functional.one_hot(y, 10)
    with pytest.warns(UserWarning) as caught:
        r = advx.audit(trained_mlp, TensorDataset(x8, onehot), advx.Linf(EPS), **KW)
    said = " ".join(str(w.message) for w in caught)
    assert "scaled by 1/255" in said and "[0, 1]" in said and "one-hot" in said
    assert r.samples == reference.samples


def test_bad_batches_say_how_to_map_them(trained_mlp, data, reference):
    x, y = data
    dicts = [{"image": x[i : i + 30], "label": y[i : i + 30]} for i in range(0, 90, 30)]
    with pytest.raises(InputError, match=r"keys=\('image', 'label'\)"):
        advx.audit(trained_mlp, dicts, advx.Linf(EPS), **KW)
    r = advx.audit(trained_mlp, dicts, advx.Linf(EPS), keys=("image", "label"), **KW)
    assert r.samples == reference.samples
    triples = [(x[i : i + 30], y[i : i + 30], "meta") for i in range(0, 90, 30)]
    with pytest.raises(InputError, match=r"3-tuples.*keys=\(0, 1\)"):
        advx.audit(trained_mlp, triples, advx.Linf(EPS), **KW)
    r = advx.audit(trained_mlp, triples, advx.Linf(EPS), batch_fn=lambda b: (b[0], b[1]), **KW)
    assert r.samples == reference.samples


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y: DataLoader(TensorDataset(x, y), shuffle=True), "shuffle=False"),
        (lambda x, y: (b for b in [(x, y)]), "read only once"),
        (lambda x, y: TensorDataset(x, torch.rand(len(y), 10)), "not one-hot"),
        (lambda x, y: TensorDataset((x * 255).to(torch.int32), y), "dtype torch.int32"),
        (lambda x, y: TensorDataset(x * 255, y), "0-255 pixel values"),
        (lambda x, y: Pairs([x[0], x[1][:, :20]], y[:2]), r"differ in size.*--resize"),
    ],
)
def test_bad_data_is_refused_before_any_work_with_what_to_do(trained_mlp, data, make, match):
    x, y = data
    with pytest.raises(InputError, match=match):
        advx.audit(trained_mlp, make(x, y), advx.Linf(EPS), **KW)


def test_as_batches_is_the_shared_layer(data):
    x, y = data
    got = list(advx.data.as_batches(TensorDataset(x, y), batch_size=40))
    assert [len(b[1]) for b in got] == [40, 40, 10]
    assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(
        torch.cat([b[1] for b in got]), y
    )
    loader = DataLoader([{"img": x[i], "y": int(y[i])} for i in range(8)], batch_size=3)
    got = list(advx.data.as_batches(loader, keys=("img", "y")))
    assert [len(b[1]) for b in got] == [3, 3, 2] and torch.equal(got[0][1], y[:3])
    with pytest.raises(InputError, match="y: images given as a tensor need their labels"):
        list(advx.data.as_batches(x))
