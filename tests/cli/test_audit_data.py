"""`advx audit --data` as users hold their data on disk: a folder of images of mixed sizes,
torchvision's CIFAR-10 folder, a Hugging Face folder; file names kept per sample."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from advx.audit.adversarial import AdversarialExamples
from advx.cli import cli

PIL = pytest.importorskip("PIL.Image")

FACTORY = """
import torch
def make(side={side}):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, 4))
"""
SUITE = '[[attacks]]\nname = "fgsm"\n[[attacks]]\nname = "pgd"\nsteps = 3\n'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "net8.py").write_text(FACTORY.format(side=8))
    (root / "net32.py").write_text(FACTORY.format(side=32))
    (root / "suite.toml").write_text(SUITE)
    rng = np.random.default_rng(0)
    folder = root / "images"
    for c in range(4):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(3):
            h, w = (10 + i, 12) if i else (8, 8)  # mixed sizes
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            PIL.fromarray(a).save(folder / f"class{c}" / f"img{i}.png")
    return root


def run(*argv: str):
    r = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def audit_args(files: Path, net: str, data: str, *extra: str) -> list[str]:
    return [
        "audit",
        "--model",
        f"{files / net}:make",
        "--data",
        data,
        "--threat",
        "linf:0.1",
        "--suite",
        str(files / "suite.toml"),
        "--eps-curve",
        "none",
        "--no-checks",
        *extra,
    ]


def test_an_image_folder_of_mixed_sizes_needs_a_resize_and_keeps_the_file_names(files, tmp_path):
    code, _, err = run(*audit_args(files, "net8.py", str(files / "images")))
    assert code == 2 and "differ in size" in err and "--resize" in err
    csv_path, adv_path = tmp_path / "s.csv", tmp_path / "adv.npz"
    code, _, err = run(
        *audit_args(
            files,
            "net8.py",
            str(files / "images"),
            "--resize",
            "8",
            "--center-crop",
            "8",
            "--out",
            str(tmp_path / "r.json"),
            "--samples-csv",
            str(csv_path),
            "--save-adv",
            str(adv_path),
        )
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"class{c}/img{i}.png" for c in range(4) for i in range(3)]
    assert (
        [int(r["label"]) for r in rows]
        == report["samples"]["label"]
        == [c for c in range(4) for _ in range(3)]
    )
    assert [int(r["robust"]) for r in rows] == [int(v) for v in report["samples"]["robust"]]
    adv = AdversarialExamples.load(adv_path)
    assert adv.names == [rows[i]["name"] for i in adv.index.tolist()]
    assert adv.x_adv.shape[1:] == (3, 8, 8)
    assert not (tmp_path / "r.json.state").exists() and not (tmp_path / "r.json.state.adv").exists()


def _cifar_folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"img_{i}.png".encode() for i in range(len(y))]
    blob = {b"data": x.reshape(len(y), -1), b"labels": y.tolist(), b"filenames": names}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(blob, f)
    return folder


def test_a_cifar10_folder_gives_what_the_same_arrays_in_an_npz_give(files, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 4, 24)
    _cifar_folder(tmp_path, x, y)
    np.savez(tmp_path / "same.npz", x=x, y=y)
    reports = []
    for data in (str(tmp_path), str(tmp_path / "same.npz")):  # the folder holding it, or the npz
        code, out, err = run(*audit_args(files, "net32.py", data, "-n", "20", "--batch-size", "7"))
        assert code == 0, err
        reports.append(json.loads(out))
    a, b = reports
    assert a["samples"] == b["samples"] and a["data"]["sha256"] == b["data"]["sha256"]
    assert a["data"]["n"] == 20 and a["samples"]["label"] == y[:20].tolist()


def test_a_cifar10_batch_that_is_not_plain_arrays_is_refused(files, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    code, _, err = run(*audit_args(files, "net32.py", str(tmp_path)))
    assert code == 2 and "not allowed in a CIFAR batch file" in err


def test_bad_resize_and_keys_are_usage_errors(files):
    code, _, err = run(*audit_args(files, "net8.py", str(files / "images"), "--resize", "ax"))
    assert code == 2 and "--resize: expected N or HxW" in err
    code, _, err = run(*audit_args(files, "net8.py", "mnist-demo", "--resize", "8"))
    assert code == 2 and "folder of images only" in err


def test_a_hugging_face_folder_without_the_package_says_what_to_install(
    files, tmp_path, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    (tmp_path / "dataset_info.json").write_text("{}")
    code, _, err = run(*audit_args(files, "net8.py", str(tmp_path)))
    assert code == 2 and "pip install 'advx[hf]'" in err


def test_a_hugging_face_folder_gives_what_the_same_arrays_in_an_npz_give(
    files, tmp_path, monkeypatch
):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 4, 10)]
    ds = datasets.Dataset.from_dict(
        {"img": [PIL.fromarray(a) for a in x], "fine": y},
        features=datasets.Features(
            {"img": datasets.Image(), "fine": datasets.ClassLabel(num_classes=4)}
        ),
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    np.savez(tmp_path / "same.npz", x=x, y=np.array(y))
    code, _, err = run(*audit_args(files, "net8.py", str(tmp_path / "hf")))
    assert code == 2 and "--data-keys IMAGE,LABEL" in err and "'img', 'fine'" in err
    code, out, err = run(
        *audit_args(files, "net8.py", str(tmp_path / "hf"), "--data-keys", "img,fine")
    )
    assert code == 0, err
    code, out_npz, err = run(*audit_args(files, "net8.py", str(tmp_path / "same.npz")))
    assert code == 0, err
    a, b = json.loads(out), json.loads(out_npz)
    assert a["samples"] == b["samples"] and a["data"]["sha256"] == b["data"]["sha256"]
