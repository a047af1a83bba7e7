"""`advx train` from the command line: train, checkpoint, audit; bad input fails before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
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
    # it says it will audit, before it does, and how to skip that
    assert "then auditing it on 40 held-out samples (--no-audit skips that)" in err
    assert re.search(r"auditing the trained model on 40 held-out samples .*--no-audit", err)
    summary = json.loads(out)
    assert summary["recipe"]["name"] == "fgsm_rs" and summary["recipe"]["params"]["alpha"] == 0.12
    assert (tmp_path / "run" / "training-curve.png").exists()
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


def test_no_audit_trains_only_and_recipes_take_either_spelling(tmp_path):
    code, out, err = run(
        base(tmp_path / "a", "--recipe", "pgd_at", "-p", "steps=2", "--threat", "linf:0.1")
        + ["--no-audit"]
    )
    assert code == 0, err
    assert json.loads(out)["recipe"]["name"] == "pgd_at" and "audit" not in json.loads(out)
    assert "auditing" not in err and not (tmp_path / "a" / "report.json").exists()
    assert (tmp_path / "a" / "checkpoint.json").exists()
    code, _, err = run(base(tmp_path / "b", "--recipe", "fgsm_r", "--no-audit"))
    assert code == 2 and "did you mean 'fgsm-rs'" in err, err


CIFAR_FACTORY = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 32, 32, generator=g)
    y = torch.arange(48) % 10
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

class Dicts(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return {"image": torch.zeros(3, 32, 32), "label": 1}

def net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10)
    )
"""


def test_a_dataloader_factory_with_crop_flip_augmentation(tmp_path):
    load_file = pytest.importorskip("safetensors.torch").load_file
    f = tmp_path / "cifarish.py"
    f.write_text(CIFAR_FACTORY)
    argv = [
        "train",
        "--model",
        f"{f}:net",
        "--data",
        f"{f}:loader",
        "--epochs",
        "1",
        "--augment",
        "crop-flip",
        "--no-audit",
        "--out",
        tmp_path / "run",
    ]
    code, out, err = run(argv)
    assert code == 0, err
    assert "on 48 samples (DataLoader)" in err
    side = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert side["training"]["augment"] == "crop-flip" and side["training"]["batch_size"] == 16
    assert side["data"]["source"] == "DataLoader(TensorDataset)"
    # the same seed trains the same weights
    argv[argv.index(tmp_path / "run")] = tmp_path / "again"
    assert run(argv)[0] == 0
    a = json.loads((tmp_path / "again" / "checkpoint.json").read_text())
    first = load_file(tmp_path / "run" / side["weights"])
    second = load_file(tmp_path / "again" / a["weights"])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # a factory of dicts is refused saying how to map them; no audit data for a factory
    argv[argv.index(f"{f}:loader")] = f"{f}:Dicts"
    code, _, err = run(argv)
    assert code == 2 and "yields dicts" in err and "collate_fn" in err, err
    argv[argv.index(f"{f}:Dicts")] = f"{f}:loader"
    argv.remove("--no-audit")
    code, _, err = run(argv)
    assert code == 2 and "--audit-data" in err, err


def test_model_args_are_recorded_so_the_checkpoint_rebuilds(tmp_path):
    code, _, err = run(base(tmp_path / "w", "--model-arg", "width=8", "--no-audit"))
    assert code == 0, err
    import advx

    net = advx.zoo.load(tmp_path / "w").net
    assert net.conv1.out_channels == 8  # the default width is 16: the argument was kept
