"""`advx audit` from the command line: the CI gate, resume, and torchrun sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner

from advx.audit.report import json_schema
from advx.cli import cli

FACTORY = """
import torch
def make():
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
"""
# the pgd stage is gated: under torchrun the shards must agree on its margin threshold
SUITE = '[[attacks]]\nname = "fgsm"\n[[attacks]]\nname = "pgd"\nsteps = 8\nclosest = 0.5\n'


@pytest.fixture(scope="module")
def model_files(trained_mlp, tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    (root / "mlp.py").write_text(FACTORY)
    torch.save(trained_mlp.state_dict(), root / "mlp.pt")
    (root / "suite.toml").write_text(SUITE)
    return root


def args(root: Path, *extra: str) -> list[str]:
    return [
        "audit",
        "--model",
        f"{root / 'mlp.py'}:make",
        "--weights",
        str(root / "mlp.pt"),
        "--data",
        "mnist-demo",
        "--n",
        "60",
        "--threat",
        "linf:0.1",
        "--suite",
        str(root / "suite.toml"),
        "--eps-curve",
        "none",
        *extra,
    ]


def run(argv):
    r = CliRunner().invoke(cli, argv, catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_fail_under_gates(model_files, tmp_path):
    code, _, err = run(args(model_files, "--out", str(tmp_path / "r.json"), "--fail-under", "0.9"))
    assert code == 1 and "FAIL" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["robust_accuracy"] < 0.9
    assert report["model"]["weights_sha256"] and report["provenance"]["seed"] == 0
    assert not (tmp_path / "r.json.state").exists()  # the default state is removed when done
    code, _, err = run(args(model_files, "--out", str(tmp_path / "r.json"), "--fail-under", "0.01"))
    assert code == 0 and "PASS" in err


def test_report_to_stdout_and_html(model_files, tmp_path):
    code, out, _ = run(args(model_files, "--html", str(tmp_path / "r.html")))
    assert code == 0 and json.loads(out)["schema"] == "advx-report/2"
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_schema_report_prints_the_published_schema(model_files, tmp_path):
    code, out, _ = run(["schema", "report"])
    assert code == 0 and json.loads(out) == json_schema()
    assert run(["schema", "nope"])[0] == 2
    run(args(model_files, "--out", str(tmp_path / "r.json")))
    jsonschema.validate(json.loads((tmp_path / "r.json").read_text()), json.loads(out))


def test_bad_suite_and_unwritable_output_fail_before_any_work(model_files, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[attacks]]\nname = "pgd"\nsteps = 0\n')
    argv = args(model_files)
    argv[argv.index("--suite") + 1] = str(bad)
    code, _, err = run(argv)
    assert code == 2 and "steps" in err
    (tmp_path / "file").write_text("")
    code, _, err = run(args(model_files, "--out", str(tmp_path / "file" / "r.json")))
    assert code == 2 and "cannot write" in err


def test_resume_with_another_model_is_refused(model_files, tmp_path):
    state = tmp_path / "s.pt"
    assert run(args(model_files, "--resume", str(state), "--out", str(tmp_path / "a.json")))[0] == 0
    other = tmp_path / "other.pt"
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    torch.save(net.state_dict(), other)
    argv = args(model_files, "--resume", str(state))
    argv[argv.index("--weights") + 1] = str(other)
    code, _, err = run(argv)
    assert code == 2 and "different model" in err


def test_torchrun_with_two_processes_writes_the_same_report(model_files, tmp_path):
    single = tmp_path / "single.json"
    assert run(args(model_files, "--out", str(single)))[0] == 0
    sharded = tmp_path / "sharded.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVX_PROGRESS": "0"}
    argv = args(model_files, "--out", str(sharded))
    argv[argv.index("--n")] = "-n"  # torchrun's own parser would take "--n" for one of its options
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "advx",
        *argv,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(sharded.read_text())
    jsonschema.validate(b, json_schema())  # written in another process: validated here
    assert b["provenance"]["processes"] == 2
    for key in ("clean_accuracy", "robust_accuracy", "samples", "per_class", "findings"):
        assert a[key] == b[key], key
    assert [r["broke"] for r in a["cascade"]] == [r["broke"] for r in b["cascade"]]
