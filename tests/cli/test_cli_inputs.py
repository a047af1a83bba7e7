"""What a new user types: mismatched --mean/--std, an eps on the wrong scale, and the folder
advx train --out writes given to --weights."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import advx
from advx.cli import cli


def run(*argv: str):
    r = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_mean_and_std_of_different_lengths_are_a_clean_error(tmp_path):
    out = str(tmp_path / "o.npz")
    code, _, err = run(
        "attack", "fgsm", "--model", "lenet", "-n", "4", "--mean", "0.1307", "--std", "0.3081,0.2",
        "--out", out,
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert "--mean has 1 value and --std 2" in err
    code, _, err = run(
        "attack", "fgsm", "--model", "lenet", "-n", "4", "--std", "0.3,0.2", "--out", out
    )  # fmt: skip
    assert code == 2 and "--std: 2 values but the data has 1 channel" in err


def test_an_eps_that_covers_the_whole_box_is_warned_about(tmp_path):
    out = str(tmp_path / "o.npz")
    code, stdout, err = run(
        "attack", "fgsm", "--model", "lenet", "-n", "4", "--threat", "linf:30", "--out", out
    )
    assert code == 0 and "linf eps 30 covers the whole input box [0, 1]" in err
    assert "did you mean linf:30/255" in err
    code, _, err = run(
        "attack", "fgsm", "--model", "lenet", "-n", "4", "--threat", "linf:30/255", "--out", out
    )
    assert code == 0 and "covers the whole" not in err
    code, _, err = run(  # 28 x 28 pixels in [0, 1]: an L2 ball of radius 28 holds the box
        "attack", "fgsm", "--model", "lenet", "-n", "4", "--threat", "l2:28", "--out", out
    )
    assert code == 0 and "l2 eps 28 covers the whole input box" in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mnist_train):
    from advx.training import fit

    x, y = mnist_train
    folder = tmp_path_factory.mktemp("run") / "ckpt"
    torch.manual_seed(0)
    net = advx.zoo.build("lenet")
    model = advx.Classifier(net, mean=(0.1307,), std=(0.3081,))
    fit(model, x[:64], y[:64], epochs=1, batch_size=32, out=folder)
    return folder


@pytest.mark.parametrize("form", ["folder", "sidecar"])
def test_weights_take_what_advx_train_writes(checkpoint, tmp_path, form):
    weights = checkpoint if form == "folder" else checkpoint / "checkpoint.json"
    expected = advx.zoo.load(checkpoint)  # the recorded model, mean and std
    out = tmp_path / "r.json"
    suite = tmp_path / "suite.toml"
    suite.write_text('[[attacks]]\nname = "fgsm"\n')
    code, _, err = run(
        "audit", "--weights", str(weights), "--data", "mnist-demo", "-n", "8",
        "--threat", "linf:0.1", "--suite", str(suite), "--eps-curve", "none", "--no-checks",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    # the same weights and the same input space (the recorded mean/std): the same fingerprint
    assert report["model"]["sha256"] == expected.fingerprint()
    (safetensors,) = checkpoint.glob("model-*.safetensors")
    from advx._io import sha256_file

    assert report["model"]["weights_sha256"] == sha256_file(safetensors)
    # --model given too: the folder's weights go into it
    code, _, err = run(
        "attack", "fgsm", "--model", "lenet", "--weights", str(weights), "-n", "4",
        "--out", str(tmp_path / "o.npz"),
    )  # fmt: skip
    assert code == 0, err


def test_weights_of_another_architecture_from_a_folder_are_refused(checkpoint, tmp_path):
    code, _, err = run(
        "attack", "fgsm", "--model", "smallcnn", "--weights", str(checkpoint), "-n", "4",
        "--out", str(tmp_path / "o.npz"),
    )  # fmt: skip
    assert code == 2 and "does not fit" in err
    code, _, err = run("attack", "fgsm", "-n", "4", "--out", str(tmp_path / "o.npz"))
    assert code == 2 and "--model is required" in err
