"""The command line as a CI gate: exit statuses a job can tell apart, -v / -q everywhere,
no silent default data or threat for an audit."""

from __future__ import annotations

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
