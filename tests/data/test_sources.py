"""advx.data's streaming layer: image folders read lazily, CIFAR-10 batches, the shared
batch normalisation, and the append-only file of adversarial examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from advx.audit.adversarial import AdvStore
from advx.data import ImageFolder, as_batches, as_source, load_image_folder
from advx.errors import InputError

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i, (h, w) in enumerate([(8, 8), (12, 10), (9, 16)]):
            PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png"
            )
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_an_image_folder_resizes_and_crops_and_names_its_files(folder):
    ds = ImageFolder(folder, resize=8, center_crop=(6, 8))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    assert ds.names == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    x, y = ds[4]
    assert x.shape == (3, 6, 8) and y == 1 and 0 <= float(x.min()) and float(x.max()) <= 1
    # the 8x8 image is only cropped: its rows 1..6 exactly
    raw = torch.from_numpy(np.array(PIL.open(folder / "cat" / "0.png"))).permute(2, 0, 1)
    assert torch.equal(ds[0][0], raw[:, 1:7, :].float() / 255)
    batches = list(as_batches(DataLoader(ds, batch_size=4)))
    assert [b[0].shape[0] for b in batches] == [4, 2]


def test_mixed_sizes_without_a_resize_name_the_files(folder):
    src = as_source(ImageFolder(folder))
    with pytest.raises(InputError, match=r"cat/0\.png.*cat/1\.png.*resize"):
        src.scan()
    with pytest.raises(InputError, match="center_crop: 20x20 is larger"):
        ImageFolder(folder, center_crop=20)[0]


def test_an_equal_size_folder_reads_as_the_in_memory_loader_does(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            PIL.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png"
            )
    x, y = load_image_folder(tmp_path)
    sc = as_source(ImageFolder(tmp_path)).scan()
    got = torch.cat([b[0] for b in as_batches(ImageFolder(tmp_path), batch_size=3)])
    assert torch.equal(got, x) and torch.equal(sc.y, y) and sc.shape == (1, 5, 7)
    from advx.data import data_sha256

    assert sc.sha256 == data_sha256(x, y)


def test_the_adversarial_examples_file_is_cut_back_to_what_the_state_accounts_for(tmp_path):
    path = tmp_path / "s.adv"
    store = AdvStore(path, shape=(2, 3), dtype=torch.float64)
    a, b = torch.rand(4, 2, 3, dtype=torch.float64), torch.rand(3, 2, 3, dtype=torch.float64)
    assert store.append(a).tolist() == [0, 1, 2, 3]
    store.append(b)  # written after the last saved state: a resume drops it
    store.close()
    again = AdvStore(path, shape=(2, 3), dtype=torch.float64, count=4)
    assert path.stat().st_size == 4 * 6 * 8
    assert torch.equal(again.read(torch.tensor([3, 0])), a[[3, 0]])
    assert again.append(b).tolist() == [4, 5, 6]
    assert torch.equal(again.read(torch.tensor([6])), b[[2]])
    again.close()
    with pytest.raises(InputError, match="fewer examples than the state file says"):
        AdvStore(path, shape=(2, 3), dtype=torch.float64, count=9)
    bf = AdvStore(None, shape=(2,), dtype=torch.bfloat16)
    v = torch.tensor([[0.5, -1.25]], dtype=torch.bfloat16)
    bf.append(v)
    assert torch.equal(bf.read(torch.tensor([0])), v)
    bf.close()


def test_load_reads_a_cifar10_folder_into_memory_as_other_commands_need(tmp_path):
    import pickle

    from advx.data import load

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": x.reshape(5, -1), b"labels": [1, 2, 3, 4, 5]}, f)
    xs, ys = load(tmp_path, n=4)
    assert torch.equal(xs, torch.from_numpy(x[:4]).float() / 255) and ys.tolist() == [1, 2, 3, 4]
    with pytest.raises(InputError, match="split: expected test or train"):
        load(folder, split="val")
