"""`advx attack ... --curve curve.png`: robust accuracy against eps from one minimum-norm run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import advx
from advx.cli import cli

pytest.importorskip("matplotlib")

FACTORY = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
"""


@pytest.fixture(scope="module")
def model_args(trained_mlp, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp")
    (root / "mlp.py").write_text(FACTORY)
    torch.save(trained_mlp.state_dict(), root / "mlp.pt")
    return ["--model", f"{root / 'mlp.py'}:make", "--weights", str(root / "mlp.pt")]


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("threat", ["l2:inf", "l2:1.5"])
def test_a_minimum_norm_run_plots_its_curve(model_args, tmp_path, threat):
    out, png = tmp_path / "fmn.npz", tmp_path / "curve.png"
    code, stdout, stderr = run(
        "attack", "fmn", *model_args, "--data", "mnist-demo", "-n", "16",
        "--threat", threat, "-p", "steps=20", "--out", str(out), "--curve", str(png),
    )  # fmt: skip
    assert code == 0, stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads(stdout)["summary"]["curve"]
    assert curve["png"] == str(png) and "upper bound" in curve["note"]
    with np.load(out) as f:
        success, distance = f["success"], f["distance"].astype(np.float64)
    budget = float(threat.split(":")[1])
    if np.isinf(budget):
        assert curve["eps_max"] >= distance[success].max()  # the plot reaches every success
        assert "beyond" not in curve["note"]
    else:
        assert curve["eps_max"] == budget and "beyond the attack's eps" in curve["note"]
    # the last point of the plot: the share the attack did not break within eps_max
    within = success & (distance <= curve["eps_max"] * (1 + 1e-5) + 1e-5)
    assert curve["robust_accuracy_at_eps_max"] == pytest.approx(1 - within.mean())


def test_a_fixed_eps_attack_is_refused_before_any_work(model_args, tmp_path):
    out, png = tmp_path / "pgd.npz", tmp_path / "curve.png"
    code, _, stderr = run(
        "attack", "pgd", *model_args, "--data", "mnist-demo", "-n", "4",
        "--threat", "linf:0.1", "--out", str(out), "--curve", str(png),
    )  # fmt: skip
    assert code == 2 and "fixed-eps attack" in stderr and "advx attack fmn" in stderr
    assert "linf:inf" in stderr
    assert not out.exists() and not png.exists()


def test_every_minimum_norm_attack_is_accepted_and_no_fixed_eps_one():
    from advx.cli.attack import _check_curve
    from advx.errors import InputError

    infos = {name: advx.attacks.info(name) for name in advx.attacks.list_attacks()}
    assert any(i["minimum_norm"] for i in infos.values())
    assert not all(i["minimum_norm"] for i in infos.values())
    for name, i in infos.items():
        t = {"linf": advx.Linf, "l2": advx.L2, "l1": advx.L1}[i["norms"][0]](0.5)
        attack = advx.attacks.create(name, t)
        if i["minimum_norm"]:
            _check_curve(attack, t)
        else:
            with pytest.raises(InputError, match="fixed-eps attack"):
                _check_curve(attack, t)
