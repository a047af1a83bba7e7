"""The command line as a CI gate: exit statuses a job can tell apart, -v / -q everywhere,
no silent default data or threat for an audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from advx.cli import cli

CRASHING = """
import torch
class Boom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(784, 10)
    def forward(self, x):
        raise RuntimeError("boom inside the model")
def make():
    return Boom()
"""


def run(*argv: str):
    r = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def crashing(tmp_path) -> str:
    (tmp_path / "crash.py").write_text(CRASHING)
    return f"{tmp_path / 'crash.py'}:make"


def test_a_crash_exits_3_with_one_line(crashing, tmp_path):
    code, out, err = run(
        "attack", "fgsm", "--model", crashing, "-n", "2", "--out", str(tmp_path / "o.npz")
    )
    assert code == 3
    lines = err.strip().splitlines()
    assert lines[0] == "advx: internal error: RuntimeError: boom inside the model"
    assert "Traceback" not in err and "-v" in lines[-1]
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_crash_shows_its_traceback_with_v(crashing, tmp_path, where):
    argv = ["attack", "fgsm", "--model", crashing, "-n", "2", "--out", str(tmp_path / "o.npz")]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    code, _, err = run(*argv)
    assert code == 3
    assert "Traceback (most recent call last)" in err and 'crash.py", line 8' in err


def test_exit_statuses_seen_by_a_shell(crashing, tmp_path):
    """The real process: what a CI runner sees."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ADVX_PROGRESS": "0"}

    def status(*argv: str) -> int:
        cmd = [sys.executable, "-m", "advx", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120).returncode

    assert status("schema", "report") == 0
    assert status("schema", "nope") == 2  # a usage error
    assert status("attack", "fgsm", "--model", "lenet", "--bogus") == 2
    out = str(tmp_path / "o.npz")
    assert status("attack", "fgsm", "--model", crashing, "-n", "2", "--out", out) == 3


def test_audit_requires_data_and_threat():
    code, _, err = run("audit", "--model", "lenet", "--threat", "linf:0.3")
    assert code == 2 and "--data" in err
    code, _, err = run("audit", "--model", "lenet", "--data", "mnist-demo")
    assert code == 2 and "--threat" in err
    data_help = run("audit", "--help")[1].split("--data")[1].split("--split")[0]
    assert "[required]" in data_help and "default" not in data_help


def test_a_missing_input_file_is_a_usage_error(tmp_path):
    code, _, err = run(
        "audit",
        "--model",
        "lenet",
        "--data",
        str(tmp_path / "nope.npz"),
        "--threat",
        "linf:0.3",
    )
    assert code == 2 and "nope.npz" in err and "Traceback" not in err


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_every_subcommand_takes_v_and_q():
    seen = list(_commands(cli))
    assert {"audit", "attack", "schema", "list"} <= {p[0] for p, _ in seen}
    for path, cmd in seen:
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"-v", "-q"} <= opts, path
    # and they run: the callbacks never see them
    for argv in (["schema", "report", "-v"], ["list", "-q"], ["-q", "list", "--json", "-vv"]):
        code, out, _ = run(*argv)
        assert code == 0 and out.strip(), argv


def test_quiet_drops_the_progress_lines_but_not_the_verdict(tmp_path):
    base = [
        "audit",
        "--model",
        "lenet",
        "--data",
        "mnist-demo",
        "-n",
        "8",
        "--threat",
        "linf:0.3",
        "--suite",
        str(_fgsm_suite(tmp_path)),
        "--eps-curve",
        "none",
        "--no-checks",
        "--out",
        str(tmp_path / "r.json"),
        "--fail-under",
        "0.99",
    ]
    code, _, err = run(*base)
    assert code == 1 and "clean accuracy" in err and "FAIL" in err
    code, _, err = run(*base, "-q")
    assert code == 1 and "clean accuracy" not in err and "wrote" not in err
    assert err.startswith("FAIL")


def _fgsm_suite(tmp_path: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text('[[attacks]]\nname = "fgsm"\n')
    return path


FACTORY = """
import torch
def make():
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
"""


@pytest.fixture(scope="module")
def models(trained_mlp, tmp_path_factory):
    """The factory, a trained model's weights (the baseline) and a barely trained one's."""
    import torch
    from torch import nn

    root = tmp_path_factory.mktemp("gate")
    (root / "mlp.py").write_text(FACTORY)
    torch.save(trained_mlp.state_dict(), root / "good.pt")
    torch.manual_seed(3)
    weak = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    torch.save(weak.state_dict(), root / "weak.pt")
    _fgsm_suite(root)
    return root


def audit_args(root: Path, weights: str, *extra: str, threat: str = "linf:0.05") -> list[str]:
    return [
        "audit",
        "--model",
        f"{root / 'mlp.py'}:make",
        "--weights",
        str(root / weights),
        "--data",
        "mnist-demo",
        "-n",
        "40",
        "--threat",
        threat,
        "--suite",
        str(root / "suite.toml"),
        "--eps-curve",
        "none",
        "--no-checks",
        *extra,
    ]


@pytest.fixture(scope="module")
def baseline(models):
    path = models / "base.json"
    code, _, err = run(*audit_args(models, "good.pt", "--out", str(path)))
    assert code == 0, err
    return path


def test_audit_against_a_baseline_gates_a_regression(models, baseline, tmp_path):
    import xml.etree.ElementTree as ET

    md, xml, new = tmp_path / "s.md", tmp_path / "j.xml", tmp_path / "new.json"
    code, _, err = run(
        *audit_args(models, "weak.pt", "--out", str(new)),
        *("--baseline", str(baseline), "--max-drop", "0.01"),
        *("--summary-md", str(md), "--junit", str(xml)),
    )
    assert code == 1 and "FAIL" in err and "newly broken" in err
    assert (
        md.read_text().startswith("## advx audit: FAIL")
        and "Against the baseline" in md.read_text()
    )
    cases = ET.parse(xml).getroot().findall("./testsuite/testcase")
    assert [c.find("failure") is not None for c in cases] == [False, True]  # reliable; the drop
    # the same model as the baseline: passes the same gate
    code, _, err = run(
        *audit_args(models, "good.pt"), "--baseline", str(baseline), "--max-drop", "0.0"
    )
    assert code == 0 and "PASS" in err


def test_compare_command(models, baseline, tmp_path):
    new = tmp_path / "new.json"
    assert run(*audit_args(models, "weak.pt", "--out", str(new)))[0] == 0
    html, out = tmp_path / "c.html", tmp_path / "c.json"
    code, stdout, err = run(
        "compare", str(baseline), str(new), "--max-drop", "0.01", "--html", str(html),
        "--json", str(out),
    )  # fmt: skip
    assert code == 1 and "FAIL" in err and stdout == ""
    doc = json.loads(out.read_text())
    assert doc["schema"] == "advx-comparison/1" and doc["passed"] is False
    assert doc["robust_accuracy"]["delta"] < -0.01 and doc["newly_broken"]
    assert 'id="verdict">FAIL' in html.read_text()
    code, stdout, err = run("compare", str(new), str(baseline), "--max-drop", "0.01")
    assert code == 0 and json.loads(stdout)["passed"] is True
    code, _, err = run("compare", str(baseline), str(tmp_path / "nope.json"))
    assert code == 2 and "nope.json" in err


def test_an_incomparable_baseline_is_refused_before_any_work(models, baseline, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = run(
        *audit_args(models, "weak.pt", "--out", str(out), threat="linf:0.1"),
        "--baseline",
        str(baseline),
    )
    assert code == 2 and "threat models differ" in err and not out.exists()
    code, _, err = run(*audit_args(models, "weak.pt"), "--max-drop", "0.01")
    assert code == 2 and "--baseline" in err


def test_save_adv_writes_what_the_report_found(models, tmp_path):
    import numpy as np

    out, adv = tmp_path / "r.json", tmp_path / "adv.npz"
    code, _, err = run(*audit_args(models, "weak.pt", "--out", str(out), "--save-adv", str(adv)))
    assert code == 0 and "adversarial example" in err
    report = json.loads(out.read_text())
    with np.load(adv) as z:
        index, stage = z["index"].tolist(), z["stage"].tolist()
        assert z["x_adv"].shape == (len(index), 1, 28, 28) and z["x_adv"].dtype == np.float32
    broken = [i for i, b in enumerate(report["samples"]["broken_by"]) if b >= 0]
    assert index == broken and stage == [report["samples"]["broken_by"][i] for i in broken]
