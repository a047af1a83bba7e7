"""``advx guard init`` / ``advx guard update``: exit 0 promoted, 1 refused, 2 bad input."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import advx
from advx.cli import cli
from advx.guard.reload import ModelDirReloader
from advx.guard.service import create_app
from advx.guard.versions import ModelDir

from .._server import serve

SPEC = f"{Path(__file__).parent / '_loop_model.py'}:mlp"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def files(trained_mlp, mnist_train, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_update")
    torch.save(trained_mlp.state_dict(), d / "w.pt")
    x, y = mnist_train
    model = advx.Classifier(trained_mlp, bounds=(0, 1))
    x_adv = advx.PGD(advx.Linf(0.1), steps=10)(model, x[:200], y[:200]).x_adv
    np.savez(d / "reviewed.npz", x=x_adv.numpy(), y=y[:200].numpy())
    np.savez(d / "wrong.npz", x=x_adv.numpy(), y=((y[:200] + 1) % 10).numpy())
    np.savez(d / "train.npz", x=x[200:1700].numpy(), y=y[200:1700].numpy())
    return d


def test_init_then_update_promotes_and_a_regression_exits_1(files, tmp_path):
    md = tmp_path / "models"
    code, out, err = run(
        "guard", "init", "--model-dir", md, "--model", SPEC, "--weights", files / "w.pt",
        "--data", "mnist-demo", "--split", "test", "--detectors", "energy", "--fpr", "0.1",
    )  # fmt: skip
    assert code == 0, err
    assert "v0001 is current" in out and ModelDir(md).current() == "v0001"
    code, out, err = run(
        "guard", "init", "--model-dir", md, "--model", SPEC, "--data", "mnist-demo"
    )  # fmt: skip
    assert code == 2 and "already holds versions" in err

    common = [
        "--model-dir", md, "--data", files / "train.npz", "--audit-data", "mnist-demo",
        "--audit-split", "test", "--threat", "linf:0.1", "--max-drop", "0.02",
    ]  # fmt: skip
    reloader = ModelDirReloader(md)
    app = create_app(reloader.load(), name="digits", reloader=reloader, admin_token="tok")
    with serve(app) as url:
        code, out, err = run(
            "guard", "update", *common, "--reviewed", files / "reviewed.npz", "--json",
            "--reload-url", url, "--admin-token", "tok",
        )  # fmt: skip
        assert code == 0, out + err
        doc = json.loads(out)
        assert doc["promoted"] and doc["version"] == "v0002" and doc["parent"] == "v0001"
        assert doc["new"]["reviewed_accuracy"] > doc["old"]["reviewed_accuracy"]
        assert ModelDir(md).current() == "v0002"
        assert doc["reload"]["ok"] and doc["reload"]["version"] == "v0002"
        assert httpx.get(f"{url}/health").json()["model_version"] == "v0002"
        assert "serving v0002" in err

    code, out, err = run(
        "guard", "update", *common, "--reviewed", files / "wrong.npz",
        "--review-share", "0.5", "--lr", "3e-3",
    )  # fmt: skip
    assert code == 1, out + err
    assert out.startswith("REFUSED (current was v0002)") and "dropped" in out
    assert ModelDir(md).current() == "v0002"


def test_bad_input_exits_2(files, tmp_path):
    md = tmp_path / "models"
    base = ["guard", "update", "--model-dir", md, "--reviewed", files / "reviewed.npz"]
    code, _, err = run(*base, "--data", "mnist-demo", "--audit-data", "mnist-demo")
    assert code == 2 and "no current version" in err and "advx guard init" in err
    code, _, err = run(*base, "--data", "mnist-demo", "--audit-data", tmp_path / "none.npz")
    assert code == 2 and "--audit-data" in err
    code, _, err = run(
        *base, "--data", "mnist-demo", "--audit-data", "mnist-demo", "--reload-url", "http://x"
    )
    assert code == 2 and "admin token" in err
    # --recipe takes the README's spelling too, and suggests a close name for a typo
    code, _, err = run(
        *base, "--data", "mnist-demo", "--audit-data", "mnist-demo", "--recipe", "pgd_at"
    )
    assert code == 2 and "no current version" in err
    code, _, err = run(
        *base, "--data", "mnist-demo", "--audit-data", "mnist-demo", "--recipe", "pgd_a"
    )
    assert code == 2 and "did you mean 'pgd-at'" in err, err


def test_serve_model_dir_refuses_a_bad_start(tmp_path):
    code, _, err = run("serve", "--model-dir", tmp_path / "empty", "--port", "0")
    assert code == 2 and "no current version" in err
    code, _, err = run("serve", "--model-dir", tmp_path, "--model", "lenet")
    assert code == 2 and "leave out --model" in err


def test_versions_and_a_rollback(files, tmp_path, mnist_test):
    md = tmp_path / "models"
    code, _, err = run(
        "guard", "init", "--model-dir", md, "--model", SPEC, "--weights", files / "w.pt",
        "--data", "mnist-demo", "--split", "test", "--detectors", "none",
    )  # fmt: skip
    assert code == 0, err
    d = ModelDir(md)
    v1 = d.load()
    d.add(v1.model, v1.policy, model_spec=SPEC, parent="v0001")  # the same weights, again
    code, out, err = run("guard", "promote", "--model-dir", md, "v0002")
    assert code == 0 and "v0002 is current" in out and "(was v0001)" in out
    code, out, _ = run("guard", "versions", "--model-dir", md)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("  v0001") and lines[1].startswith("* v0002")
    code, out, _ = run("guard", "versions", "--model-dir", md, "--json")
    doc = json.loads(out)
    assert doc["current"] == "v0002" and [m["parent"] for m in doc["versions"]] == [None, "v0001"]
    # roll back while a service serves v0002: it follows
    reloader = ModelDirReloader(md)
    with serve(create_app(reloader.load(), name="d", reloader=reloader, admin_token="t")) as url:
        code, out, err = run(
            "guard", "promote", "--model-dir", md, "v0001", "--reload-url", url,
            "--admin-token", "t",
        )  # fmt: skip
        assert code == 0 and "serving v0001" in err
        assert httpx.get(f"{url}/health").json()["model_version"] == "v0001"
    # a damaged version is refused and the pointer stays
    weights = next((md / "v0002").glob("model-*.safetensors"))
    weights.write_bytes(b"not weights")
    code, _, err = run("guard", "promote", "--model-dir", md, "v0002")
    assert code == 2 and "v0002 cannot be loaded" in err
    assert ModelDir(md).current() == "v0001"
