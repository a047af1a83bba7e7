"""The `advx` command: outputs, exit codes (0 ok, 1 bar missed, 2 usage/input), atomic files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from advx.cli import cli


def run(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_list_names_every_registered_attack():
    import advx

    code, out, _ = run("list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {r["name"] for r in rows} == set(advx.attacks.list())
    pgd = next(r for r in rows if r["name"] == "pgd")
    assert pgd["kind"] == "white-box" and pgd["norms"] == ["linf", "l2", "l1"]
    code, out, _ = run("list")
    assert code == 0 and "cw" in out and "min-norm" in out


def test_attack_writes_results_and_a_json_summary(tmp_path):
    out = tmp_path / "adv.npz"
    code, stdout, _ = run(
        "attack",
        "pgd",
        "--model",
        "lenet",
        "--data",
        "mnist-demo",
        "--n",
        "24",
        "--threat",
        "linf:0.3",
        "-p",
        "steps=5",
        "--out",
        str(out),
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["summary"]["n"] == 24 and summary["params"]["steps"] == 5
    assert summary["provenance"]["data_sha256"] and summary["out"] == str(out)
    with np.load(out) as f:
        assert f["x_adv"].shape == (24, 1, 28, 28)
        assert f["success"].dtype == bool and f["queries"].min() >= 1
        assert (np.abs(f["x_adv"] - np.load(out)["x_adv"]) == 0).all()
        assert f["distance"].max() <= 0.3 + 1e-5
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("target", ["random", "3"])
def test_targeted_attack_from_the_command_line(tmp_path, target):
    out = tmp_path / "adv.npz"
    code, stdout, stderr = run(
        "attack", "fgsm", "--model", "lenet", "--n", "30", "--target", target, "--out", str(out)
    )
    assert code == 0
    with np.load(out) as f:
        assert (f["target"] != f["y"]).all()
        if target == "3":
            assert (f["target"] == 3).all() and len(f["y"]) < 30 and "already the target" in stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--threat", "linf"], "NORM:EPS"),
        (["--threat", "l7:0.1"], "norm"),
        (["-p", "stepz=3"], "parameters are"),
        (["-p", "steps"], "KEY=VALUE"),
        (["--model", "nope.module:f"], "cannot import"),
        (["--data", "missing.npz"], "neither a built-in"),
        (["--target", "12"], "classes 0..9"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "adv.npz"
    base = {"--model": "lenet", "--threat": "linf:0.1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["attack", "fgsm", "--n", "5", "--out", str(out)]
    for k, v in base.items():
        argv += [k, v]
    code, _, stderr = run(*argv)
    assert code == 2 and message in stderr
    assert not out.exists()


def test_data_with_nan_exits_2(tmp_path):
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    x[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(4))
    code, _, stderr = run(
        "attack",
        "fgsm",
        "--model",
        "lenet",
        "--data",
        str(tmp_path / "d.npz"),
        "--out",
        str(tmp_path / "o.npz"),
    )
    assert code == 2 and "NaN" in stderr and not (tmp_path / "o.npz").exists()


def test_an_unwritable_output_is_found_before_the_run(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        code, _, stderr = run("attack", "fgsm", "--model", "lenet", "--out", str(locked / "o.npz"))
        assert code == 2 and "cannot write" in stderr
    finally:
        locked.chmod(0o700)


def test_an_output_below_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, stderr = run(
        "attack", "fgsm", "--model", "lenet", "--out", str(tmp_path / "afile" / "o.npz")
    )
    assert code == 2 and "cannot write" in stderr


def test_unknown_attack_is_a_usage_error():
    code, _, stderr = run("attack", "nope", "--model", "lenet", "--out", "x.npz")
    assert code == 2 and "nope" in stderr


def test_the_quick_demo_tells_the_whole_story(tmp_path):
    """``advx demo --quick``: every step runs, every file is written, and the story's claims
    hold: the standard model is broken, FGSM-RS makes it robust (and the audit trusts that),
    distillation only hides the gradients (the audit flags it, CW breaks it)."""
    from advx.cli._story import QUICK

    code, stdout, _ = run("demo", "--quick", "--out", str(tmp_path / "d"))
    assert code == 0
    assert "robust acc" in stdout and "pgd" in stdout and "cw" in stdout
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["n"] == QUICK.n and summary["training"]["samples"] == QUICK.train_n
    story = summary["story"]
    assert [m["model"] for m in story["models"]] == ["standard", "FGSM-RS", "distilled (T=100)"]
    for m, key in zip(story["models"], ("standard", "fgsm-rs", "distilled")):
        report = json.loads((tmp_path / "d" / f"audit-{key}.json").read_text())
        assert (
            report["data"]["n"] == QUICK.audit_n
            and report["robust_accuracy"] == m["robust_accuracy"] <= m["clean_accuracy"]
        )
        assert m["model"] in stdout
    std, robust, distilled = story["models"]
    assert std["clean_accuracy"] > 0.9 and std["robust_accuracy"] < 0.1, std
    assert robust["robust_accuracy"] > 0.5 and robust["reliable"], robust
    assert "masked-gradients" in distilled["findings"] and not distilled["reliable"], distilled
    hidden = story["distilled_attacks"]
    assert hidden["cw_success_rate"] > 0.9 > 0.5 > hidden["pgd_ce_success_rate"], hidden
    page = (tmp_path / "d" / "report.html").read_text()
    assert all(m["model"] in page for m in story["models"]) and "<img" in page
    assert {r["attack"] for r in summary["rows"]} == {"fgsm", "pgd", "cw"}
    pgd = [r for r in summary["rows"] if r["attack"] == "pgd"]
    assert pgd[-1]["robust_accuracy"] < pgd[0]["robust_accuracy"] <= summary["clean_accuracy"]
    png = (tmp_path / "d" / "examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_options_override_the_preset(tmp_path, monkeypatch):
    """--quick picks the preset; an explicit option wins over it. The steps are replaced by one
    that records what it was given, so that this runs in a second."""
    from advx.cli import _story

    seen = []

    def step(demo):
        seen.append(demo)
        demo.summary["rows"] = []  # what the table prints

    monkeypatch.setattr(_story, "STEPS", [step])
    code, _, err = run("demo", "--quick", "--n", "30", "--out", str(tmp_path / "d"))
    assert code == 0, err
    (demo,) = seen
    # --n 30 caps the audited and CW digits to the 30 attacked
    q = _story.QUICK
    assert demo.size == _story.replace(q, n=30, audit_n=min(30, q.audit_n), cw_n=min(30, q.cw_n))
    assert demo.x.shape[0] == 30 and demo.x_train.shape[0] == _story.QUICK.train_n
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["files"]["summary"]
    code, _, _ = run("demo", "--out", str(tmp_path / "e"))
    assert code == 0 and seen[1].size == _story.FULL and seen[1].x_train.shape[0] == 4000


def test_the_console_script_and_python_m_run():
    out = subprocess.run(
        [sys.executable, "-m", "advx", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "advx" in out.stdout


@pytest.mark.slow
def test_the_full_demo_shows_what_it_claims(tmp_path):
    code, stdout, _ = run("demo", "--out", str(tmp_path / "d"))
    assert code == 0
    std, robust, distilled = json.loads((tmp_path / "d" / "summary.json").read_text())["story"][
        "models"
    ]
    assert std["robust_accuracy"] < 0.1 and robust["robust_accuracy"] > 0.6 and robust["reliable"]
    assert "masked-gradients" in distilled["findings"] and not distilled["reliable"]
