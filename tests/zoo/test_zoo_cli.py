"""Zoo models and factory arguments on the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import advx
from advx.cli import cli
from advx.zoo import build, hub


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


ATTACK = ("attack", "fgsm", "--data", "mnist-demo", "--n", "16", "--threat", "linf:0.1")


def test_a_timm_folder_attacks_like_the_hand_declared_classifier(tmp_path):
    torch.manual_seed(0)
    net = build("lenet")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    hub.save(
        advx.Classifier(net, mean=(0.1307,), std=(0.3081,)), tmp_path / "m", architecture="lenet"
    )
    code, _, err = run(
        *ATTACK, "--model", f"timm:{tmp_path / 'm'}", "--out", str(tmp_path / "a.npz")
    )
    assert code == 0, err
    assert "input space from" in err and "mean 0.1307" in err
    code, _, err = run(
        *ATTACK,
        "--model",
        "lenet",
        "--weights",
        str(tmp_path / "w.pt"),
        "--mean",
        "0.1307",
        "--std",
        "0.3081",
        "--out",
        str(tmp_path / "b.npz"),
    )
    assert code == 0, err
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["x_adv"], b["x_adv"])
        assert np.array_equal(a["success"], b["success"])


def test_model_args_reach_a_file_factory(tmp_path):
    factory = tmp_path / "mine.py"
    factory.write_text(
        "from advx.zoo.nets import LeNet\n\ndef make(*, width):\n    return LeNet(width=width)\n"
    )
    code, _, err = run(
        *ATTACK,
        "--model",
        f"{factory}:make",
        "--model-arg",
        "width=8",
        "--out",
        str(tmp_path / "o.npz"),
    )
    assert code == 0, err
    code, _, err = run(
        *ATTACK,
        "--model",
        f"{factory}:make",
        "--model-arg",
        "width",
        "--out",
        str(tmp_path / "p.npz"),
    )
    assert code == 2 and "--model-arg: expected KEY=VALUE" in err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("resnet2", "did you mean resnet20"),
        ("tim:resnet18", "did you mean timm:resnet18"),
        ("robustbench:Standard", "Standard.pt"),
    ],
)
def test_bad_zoo_specs_exit_2_with_a_hint(tmp_path, spec, expected):
    code, _, err = run(
        *ATTACK,
        "--model",
        spec,
        "--model-arg",
        f"model_dir={tmp_path}",
        "--out",
        str(tmp_path / "o.npz"),
    )
    assert code == 2 and expected in err, err


def test_images_of_another_size_than_the_config_get_a_warning(tmp_path):
    torch.manual_seed(0)
    clf = advx.Classifier(build("lenet"), mean=(0.5,), std=(0.25,))
    hub.save(clf, tmp_path / "m", architecture="lenet", input_size=(1, 32, 32))
    out = str(tmp_path / "o.npz")
    code, _, err = run(*ATTACK, "--model", f"timm:{tmp_path / 'm'}", "--out", out)
    assert "the images are 28x28 but the model was trained at 32x32" in err
    hub.save(clf, tmp_path / "m", architecture="lenet", input_size=(3, 28, 28))
    code, _, err = run(*ATTACK, "--model", f"timm:{tmp_path / 'm'}", "--out", out)
    assert code == 2 and "the images have 1 channel but the model takes 3" in err
