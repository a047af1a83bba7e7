"""``advx guard calibrate``: a policy file a guard can be rebuilt from, guarantees printed,
exit 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from advx.cli import cli
from advx.guard import Guard, Policy
from advx.models import Classifier
from advx.zoo import build

NET = """
from torch import nn

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
"""


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def spec(trained_mlp, tmp_path_factory):
    d = tmp_path_factory.mktemp("net")
    (d / "net.py").write_text(NET)
    torch.save(trained_mlp.state_dict(), d / "w.pt")
    return f"{d / 'net.py'}:mlp", d / "w.pt"


def test_calibrate_writes_a_policy_the_guard_rebuilds_from(spec, tmp_path, mnist_test):
    model_spec, weights = spec
    out = tmp_path / "policy.toml"
    code, stdout, stderr = run(
        "guard", "calibrate", "--model", model_spec, "--weights", weights,
        "--data", "mnist-demo", "--split", "test", "-n", 400,
        "--fpr", 0.1, "--detectors", "energy,max_logit", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    assert "false-positive rate" in stdout and "interval [" in stdout
    assert f"wrote {out}" in stderr
    pol = Policy.load(out)
    assert set(pol.detectors) == {"energy", "max_logit"}
    assert pol.guarantees["fpr"]["target"] == 0.1 and pol.calibration["n"] == 400
    # the same weights loaded in Python give the same model: the guard takes the policy
    model = Classifier(build(model_spec, weights=str(weights)))
    guard = Guard.from_policy(model, out)
    x, _ = mnist_test
    held = guard(x[400:700])
    rate = 1 - held.count("accept") / len(held)
    lo, hi = pol.guarantees["fpr"]["interval"]
    assert lo <= rate <= hi


def test_risk_and_json_output(spec, tmp_path):
    model_spec, weights = spec
    out = tmp_path / "policy.toml"
    code, stdout, stderr = run(
        "guard", "calibrate", "--model", model_spec, "--weights", weights,
        "--data", "mnist-demo", "--split", "test", "-n", 600, "--detectors", "energy",
        "--risk", 0.05, "--delta", 0.1, "--on-detect", "reject", "--json", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    doc = json.loads(stdout)
    r = doc["selective_risk"]
    assert r["target"] == 0.05 and r["delta"] == 0.1 and r["upper_bound"] <= 0.05
    assert doc["policy"]["on_detect"] == "reject"
    assert Policy.load(out).hash == doc["policy"]["hash"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--fpr", "0"], "--fpr"),
        (["--risk", "1.5"], "--risk"),
        (["--detectors", "magic"], "unknown detector kind 'magic'"),
        (["--detectors", "ensemble_disagreement"], "needs the guarded model to be an"),
        (["--data", "/nonexistent/data.npz"], "neither a built-in data set"),
        (["-n", "5"], "give at least"),
        (["--risk", "0.0001"], "cannot certify"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(spec, tmp_path, extra, words):
    model_spec, weights = spec
    out = tmp_path / "p.toml"
    args = ["guard", "calibrate", "--model", model_spec, "--weights", weights]
    args += ["--data", "mnist-demo", "--split", "test", "-n", "200", "--out", out, *extra]
    code, _, stderr = run(*args)
    assert code == 2
    assert words in stderr
    assert not out.exists()  # nothing half-written


def test_model_is_required(tmp_path):
    code, _, stderr = run("guard", "calibrate", "--out", tmp_path / "p.toml")
    assert code == 2 and "--model is required" in stderr


def test_the_command_runs_as_a_process(spec, tmp_path):
    model_spec, weights = spec
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    out = tmp_path / "p.toml"
    cmd = [sys.executable, "-m", "advx", "guard", "calibrate", "--model", model_spec]
    cmd += ["--weights", str(weights), "--data", "mnist-demo", "--split", "test", "-n", "300"]
    cmd += ["--detectors", "energy", "--fpr", "0.1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "false-positive rate" in proc.stdout and out.exists()
