"""Loaders: the embedded demo set, idx (gz or not), npz, folders of images."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from advx.data import data_sha256, load
from advx.errors import InputError


def test_the_embedded_demo_set_is_the_real_mnist_test_set():
    x, y = load("mnist-demo")
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (5000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the official first labels
    test, train = load("mnist-demo", split="test"), load("mnist-demo", split="train")
    assert len(test[0]) == 1000 and len(train[0]) == 4000
    assert torch.equal(test[0], x[:1000]) and torch.equal(train[1], y[1000:])
    assert len(load("mnist-demo", n=10)[0]) == 10


def _write_idx(path, arr, magic_type=0x08, compress=True):
    head = struct.pack(">BBBB", 0, 0, magic_type, arr.ndim) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    data = head + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_with_labels_found_beside_them(tmp_path, compress):
    imgs = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4))
    labels = np.arange(7) % 3
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", imgs, compress=compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress=compress)
    x, y = load(tmp_path / f"train-images-idx3-ubyte{suffix}")
    assert x.shape == (7, 1, 5, 4) and torch.allclose(
        x[0, 0], torch.tensor(imgs[0] / 255, dtype=torch.float32)
    )
    assert y.tolist() == labels.tolist()
    x2, _ = load(tmp_path, split="train")  # a folder of idx files
    assert torch.equal(x, x2)


def test_npz_channels_last_and_first(tmp_path):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=hwc, y=np.array([0, 1, 2, 3]))
    x, y = load(tmp_path / "a.npz")
    assert x.shape == (4, 3, 8, 8) and torch.allclose(
        x[1, 2], torch.tensor(hwc[1, :, :, 2] / 255, dtype=torch.float32)
    )
    np.savez(tmp_path / "b.npz", x=np.transpose(hwc, (0, 3, 1, 2)), y=np.array([0, 1, 2, 3]))
    assert torch.equal(load(tmp_path / "b.npz")[0], x)


def test_folder_of_images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls in ["cat", "dog"]:
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    x, y = load(tmp_path)
    assert x.shape == (6, 3, 6, 6) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_bad_data_is_refused(tmp_path):
    with pytest.raises(InputError, match="neither a built-in"):
        load("no-such-thing")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", images=np.zeros((2, 3, 3)))
    with pytest.raises(InputError, match="'x' and 'y'"):
        load(tmp_path / "y.npz")
    np.savez(tmp_path / "z.npz", x=np.full((2, 3, 3), 2.0), y=np.array([0, 1]))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load(tmp_path / "z.npz")
    with pytest.raises(InputError, match="split"):
        load("mnist-demo", split="validation")


def test_data_fingerprint_changes_with_the_data():
    x, y = load("mnist-demo", n=20)
    a = data_sha256(x, y)
    assert a == data_sha256(x.clone(), y.clone())
    y2 = y.clone()
    y2[0] += 1
    assert a != data_sha256(x, y2)
