"""fit over a Dataset or a DataLoader, crop-and-flip augmentation, the training curve."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import advx
from advx._rng import SampleRNG
from advx.errors import InputError
from advx.training import Checkpointing, Schedule, fit, standard
from advx.training.feed import crop_flip
from advx.training.plot import CURVE_FILE


def tiny_cnn(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 15 * 15, 10),
        )


@pytest.fixture(scope="module")
def cifar_like():
    """64 CIFAR-10-shaped images: random, with a class-dependent bright square."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(64) % 10
    x = torch.rand(64, 3, 32, 32, generator=g) * 0.5
    for i in range(64):
        r = int(y[i]) * 2
        x[i, :, r : r + 8, r : r + 8] = 1.0
    return x, y


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


KW = dict(schedule=Schedule(epochs=2, lr=1e-2), batch_size=16, progress=False, monitor=None)


# ---- augmentation --------------------------------------------------------------------------
def test_crop_flip_is_a_padded_crop_then_a_flip_per_sample():
    x = torch.rand(40, 3, 8, 8)
    out = crop_flip(x, SampleRNG(7, torch.arange(40)), pad=4)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips, shifts = 0, set()
    for i in range(40):
        hits = []
        for top in range(9):
            for left in range(9):
                crop = padded[i, :, top : top + 8, left : left + 8]
                if torch.equal(out[i], crop):
                    hits.append((top, left, False))
                if torch.equal(out[i], crop.flip(-1)):
                    hits.append((top, left, True))
        assert hits, f"sample {i} is not a crop of its padded image"
        flips += hits[0][2]
        shifts.add(hits[0][:2])
    assert 5 < flips < 35  # about half are flipped
    assert len(shifts) > 10  # the offsets vary between samples
    # the same ids give the same crops whatever the batch they come in
    again = crop_flip(x[10:20], SampleRNG(7, torch.arange(10, 20)), pad=4)
    assert torch.equal(again, out[10:20])
    with pytest.raises(InputError, match="image batches"):
        crop_flip(torch.rand(4, 10), SampleRNG(0, torch.arange(4)))


def test_augmented_training_is_reproducible_and_differs_from_plain(cifar_like):
    x, y = cifar_like
    a, b, c, plain = tiny_cnn(), tiny_cnn(), tiny_cnn(), tiny_cnn()
    fit(a, x, y, augment="crop-flip", seed=1, **KW)
    fit(b, x, y, augment="crop-flip", seed=1, **KW)
    fit(c, x, y, augment="crop-flip", seed=2, **KW)
    fit(plain, x, y, seed=1, **KW)
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))
    assert not same(weights(a), weights(plain))
    with pytest.raises(InputError, match="crop-flip"):
        fit(tiny_cnn(), x, y, augment="mixup", **KW)


def test_augmentation_is_recorded_and_a_resume_without_it_is_refused(cifar_like, tmp_path):
    x, y = cifar_like
    fit(tiny_cnn(), x, y, augment="crop-flip", checkpoint=tmp_path, **KW)
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    assert side["training"]["augment"] == "crop-flip"
    with pytest.raises(InputError, match="augment"):
        fit(tiny_cnn(), x, y, checkpoint=Checkpointing(tmp_path, resume=True), **KW)


# ---- a Dataset and a DataLoader ------------------------------------------------------------
def test_a_dataset_trains_exactly_as_its_tensors_do(cifar_like):
    x, y = cifar_like
    a, b = tiny_cnn(), tiny_cnn()
    fit(a, x, y, augment="crop-flip", **KW)
    fit(b, TensorDataset(x, y), augment="crop-flip", **KW)
    assert same(weights(a), weights(b))


class Listy(Dataset):
    """Items as a user's Dataset often returns them: (image, int label)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_a_shuffled_dataloader_is_reproducible_with_the_seed(cifar_like):
    x, y = cifar_like
    runs = []
    for seed in (0, 0, 1):
        net = tiny_cnn()
        loader = DataLoader(Listy(x, y), batch_size=16, shuffle=True)
        h = fit(net, loader, seed=seed, **{**KW, "batch_size": 999})
        runs.append(weights(net))
        assert len(h.epochs) == 2 and h.epochs[-1]["loss"] > 0
    assert same(runs[0], runs[1]) and not same(runs[0], runs[2])
    # the caller's RNG is left as it was, monitor drawn from the loader included
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    fit(tiny_cnn(), DataLoader(Listy(x, y), batch_size=16, shuffle=True), **{**KW, "monitor": 8})
    assert torch.equal(torch.random.get_rng_state(), before)
    # a loader with its own generator is seeded by fit too
    gen_runs = []
    for _ in range(2):
        net = tiny_cnn()
        gen = torch.Generator().manual_seed(123)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)
        fit(net, loader, augment="crop-flip", **KW)
        gen_runs.append(weights(net))
    assert same(*gen_runs)


def test_a_dataloader_run_resumes_to_the_weights_of_an_uninterrupted_one(cifar_like, tmp_path):
    x, y = cifar_like
    sched3 = Schedule(epochs=3, lr=1e-2)

    def loader():
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    kw = {**KW, "schedule": sched3, "augment": "crop-flip"}
    whole = tiny_cnn()
    fit(whole, loader(), checkpoint=tmp_path / "a", **kw)
    part = tiny_cnn()
    fit(
        part, loader(), checkpoint=tmp_path / "b", **{**kw, "schedule": Schedule(epochs=2, lr=1e-2)}
    )
    fresh = tiny_cnn(seed=9)
    h = fit(fresh, loader(), checkpoint=Checkpointing(tmp_path / "b", resume=True), **kw)
    assert h.resumed_from == 2 and len(h.epochs) == 3
    assert same(weights(fresh), weights(whole))
    side = json.loads((tmp_path / "a" / "checkpoint.json").read_text())
    assert side["data"]["n"] == 64 and side["data"]["source"] == "DataLoader(TensorDataset)"


def test_a_dataloader_gets_a_monitor_for_the_overfitting_check(cifar_like):
    x, y = cifar_like
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    h = fit(
        tiny_cnn(),
        loader,
        loss=advx.training.fgsm_rs(2 / 255),
        schedule=Schedule(epochs=1, lr=1e-2),
        progress=False,
        monitor=20,
        monitor_steps=2,
    )
    assert h.epochs[0]["monitor_adv_accuracy"] is not None


class Dicts(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": int(self.y[i])}


class Triples(Listy):
    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), f"file{i}.png"


@pytest.mark.parametrize("wrap", [lambda d: d, lambda d: DataLoader(d, batch_size=8)])
def test_dicts_and_triples_are_refused_saying_how_to_map_them(cifar_like, wrap):
    x, y = cifar_like
    with pytest.raises(InputError, match="dicts.*'image', 'label'.*collate_fn"):
        fit(tiny_cnn(), wrap(Dicts(x, y)), **KW)
    with pytest.raises(InputError, match="3-tuples.*collate_fn"):
        fit(tiny_cnn(), wrap(Triples(x, y)), **KW)


def test_bad_data_arguments(cifar_like):
    x, y = cifar_like
    with pytest.raises(InputError, match="y must be None"):
        fit(tiny_cnn(), TensorDataset(x, y), y, **KW)
    with pytest.raises(InputError, match="y is missing"):
        fit(tiny_cnn(), x, **KW)
    with pytest.raises(InputError, match="0..9"):
        fit(tiny_cnn(), DataLoader(TensorDataset(x, y + 5), batch_size=16), **KW)
    with pytest.raises(InputError, match="float"):
        fit(tiny_cnn(), TensorDataset((x * 255).to(torch.uint8), y), **KW)
    onehot = torch.nn.functional.one_hot(y, 10)
    with pytest.raises(InputError, match="one-hot"):
        fit(tiny_cnn(), TensorDataset(x, onehot), **KW)
    with pytest.raises(InputError, match="one-hot"):
        fit(tiny_cnn(), DataLoader(TensorDataset(x, onehot), batch_size=16), **KW)
    with pytest.raises(InputError, match="ToTensor"):
        fit(tiny_cnn(), Listy([object()] * 64, y), **KW)


# ---- the training curve --------------------------------------------------------------------
def test_the_training_curve_is_drawn_beside_the_checkpoint(cifar_like, tmp_path):
    pytest.importorskip("matplotlib")
    x, y = cifar_like
    h = fit(tiny_cnn(), x, y, loss=standard(), checkpoint=tmp_path, **KW)
    png = tmp_path / CURVE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert h.checkpoint == str(tmp_path / "checkpoint.json")


def test_the_curve_marks_the_catastrophic_overfitting_stop():
    pytest.importorskip("matplotlib")
    from advx.training import History
    from advx.training.plot import curve_figure

    rows = [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "train_clean_accuracy": 0.5,
            "train_adv_accuracy": 0.3,
            "monitor_clean_accuracy": 0.6,
            "monitor_adv_accuracy": acc,
        }
        for e, acc in ((1, 0.3), (2, 0.4), (3, 0.0))
    ]
    h = History(epochs=rows, stopped="catastrophic overfitting at epoch 3: ...", best_epoch=2)
    fig = curve_figure(h)
    ax_loss, ax_acc = fig.axes
    texts = [t.get_text() for t in ax_acc.texts]
    assert any("catastrophic overfitting" in t and "epoch 2 kept" in t for t in texts)
    # a vertical line at epoch 3 on both panels, and the kept epoch starred
    for ax in (ax_loss, ax_acc):
        assert any(list(line.get_xdata()) == [3, 3] for line in ax.lines)
    assert any(line.get_label() == "kept: epoch 2" for line in ax_acc.lines)
    plain = curve_figure(History(epochs=rows))
    assert not plain.axes[1].texts
