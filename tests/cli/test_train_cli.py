"""`advx train` from the command line: train, checkpoint, audit; bad input fails before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from advx.cli import cli

SUITE = '[[attacks]]\nname = "fgsm"\n[[attacks]]\nname = "pgd"\nsteps = 5\n'


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "suite.toml"
    path.write_text(SUITE)
    return path


def run(argv):
    r = CliRunner().invoke(cli, [str(a) for a in argv], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def base(out, *extra):
    return [
        "train",
        "--model",
        "lenet",
        "-n",
        "300",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--lr",
        "3e-3",
        "--out",
        out,
        *extra,
    ]


def test_train_checkpoints_and_audits_the_model(tmp_path, suite):
    code, out, err = run(
        base(
            tmp_path / "run",
            "--recipe",
            "fgsm-rs",
            "--threat",
            "linf:0.1",
            "-p",
            "alpha=0.12",
            "--audit-n",
            "40",
            "--audit-suite",
            suite,
            "--eps-curve",
            "none",
        )
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["recipe"]["name"] == "fgsm_rs" and summary["recipe"]["params"]["alpha"] == 0.12
    assert summary["history"]["epochs"][0]["monitor_adv_accuracy"] is not None
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["n"] == 40 and report["threat"]["eps"] == 0.1
    assert report["provenance"]["checkpoint"] == str(tmp_path / "run" / "checkpoint.json")
    assert summary["audit"]["robust_accuracy"] == report["robust_accuracy"]
    assert (tmp_path / "run" / "report.html").read_text().startswith("<!doctype html>")
    side = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert side["model"]["spec"] == "lenet" and side["data"]["name"] == "mnist-demo:train[:300]"
    # --resume with more epochs of a constant schedule continues from the checkpoint
    argv = base(
        tmp_path / "run",
        "--recipe",
        "fgsm-rs",
        "--threat",
        "linf:0.1",
        "-p",
        "alpha=0.12",
        "--audit-n",
        "0",
        "--resume",
    )
    argv[argv.index("--epochs") + 1] = "2"
    code, out, err = run(argv)
    assert code == 0, err
    history = json.loads(out)["history"]
    assert history["resumed_from"] == 1 and [e["epoch"] for e in history["epochs"]] == [1, 2]


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    code, _, err = run(base(tmp_path / "teacher", "--temperature", "20", "--audit-n", "0"))
    assert code == 0, err
    code, out, err = run(
        base(
            tmp_path / "student",
            "--recipe",
            "distillation",
            "--teacher",
            tmp_path / "teacher",
            "--temperature",
            "20",
            "--audit-n",
            "0",
        )
    )
    assert code == 0, err
    assert json.loads(out)["recipe"]["params"] == {"temperature": 20.0, "teacher": "LeNet"}


FIVE = (
    "import torch\n"
    "def make():\n"
    "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 5))\n"
)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--threat", "linf:1.5", "--recipe", "pgd-at"], r"eps must be in \(0, 1\)"),
        (["--recipe", "pgd-at", "-p", "steps=0"], "steps must be a positive int"),
        (["--recipe", "trades", "-p", "beta=-2"], "beta must be"),
        (["--recipe", "fgsm-rs", "-p", "steps=3"], "fgsm-rs takes alpha, not steps"),
        (["--recipe", "distillation"], "needs the teacher"),
        (["--recipe", "pgd-at", "--temperature", "3"], "has no temperature"),
        (["--audit-suite", "no-such-suite"], "neither a built-in suite"),
        (["--monitor", "many"], "--monitor"),
        (["--lr", "-1"], "lr must be a finite number > 0"),
        (["--weight-decay", "-0.1"], "weight_decay must be a finite number >= 0"),
    ],
)
def test_bad_input_exits_2_before_training(tmp_path, extra, match):
    code, _, err = run(base(tmp_path / "bad", *extra))
    assert code == 2 and "advx: error:" in err, err
    assert re.search(match, err), err
    assert not (tmp_path / "bad" / "checkpoint.json").exists()


def test_labels_that_do_not_fit_the_model_exit_2(tmp_path):
    (tmp_path / "five.py").write_text(FIVE)
    argv = base(tmp_path / "bad")
    argv[argv.index("lenet")] = f"{tmp_path / 'five.py'}:make"
    code, _, err = run(argv)
    assert code == 2 and "the model gives 5 classes" in err, err


def test_resuming_a_checkpoint_of_another_architecture_exits_2_naming_the_keys(tmp_path):
    assert run(base(tmp_path / "run", "--audit-n", "0"))[0] == 0
    argv = base(tmp_path / "run", "--audit-n", "0", "--resume")
    argv[argv.index("lenet")] = "wong_cnn"
    code, _, err = run(argv)
    assert code == 2 and "does not fit WongCNN" in err and "conv1.weight" in err, err
