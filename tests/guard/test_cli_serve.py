"""``advx serve``, ``advx guard status`` and ``advx guard canary`` against real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from advx.cli import cli
from advx.defenses import FeatureSqueezing
from advx.guard import Guard, Policy
from advx.guard.service import create_app
from advx.models import Classifier
from tests._server import free_port, serve, wait_until_up

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def test_advx_serve_serves_both_protocols_and_stops_on_sigterm():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "advx",
            "serve",
            "--model",
            "lenet",
            "--port",
            str(port),
            "--name",
            "digits",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(proc, url)
        x = torch.rand(2, 1, 28, 28)
        r = httpx.post(
            f"{url}/predict", json={"inputs": x.tolist()}, headers={"X-Request-Id": "cli-1"}
        )
        assert r.status_code == 200 and len(r.json()["decisions"]) == 2
        meta = httpx.get(f"{url}/v2/models/digits").json()
        assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]  # probed: lenet takes MNIST digits
        body = {
            "inputs": [
                {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
            ]
        }
        assert httpx.post(f"{url}/v2/models/digits/infer", json=body).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        err = proc.stderr.read()
        # structured logs: one JSON object per request line, with its request id
        lines = [json.loads(s) for s in err.splitlines() if s.startswith("{")]
        assert any(d.get("request_id") == "cli-1" and d.get("status") == 200 for d in lines), err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no_such_model_xyz"], "model"),
        (["--model", "lenet", "--input-shape", "3,32,32"], "cannot run"),
        (["--model", "lenet", "--input-shape", "a,b"], "--input-shape"),
        (["--model", "lenet", "--policy", "/nonexistent/policy.toml"], "--policy"),
        ([], "--model is required"),
    ],
)
def test_advx_serve_refuses_a_bad_start_with_exit_2(args, message):
    r = CliRunner().invoke(cli, ["serve", *args, "--port", str(free_port())])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    "content", [b"\x00\xff not toml [[[", b"min_confidence = [", b'min_confidence = "high"\n']
)
def test_advx_serve_refuses_a_corrupt_policy(tmp_path, content):
    bad = tmp_path / "policy.toml"
    bad.write_bytes(content)
    r = CliRunner().invoke(cli, ["serve", "--model", "lenet", "--policy", str(bad)])
    assert r.exit_code == 2 and "policy" in r.output, r.output
    assert "Traceback" not in r.output


def test_advx_serve_refuses_a_policy_for_another_model(tmp_path):
    save = getattr(Policy, "save", None)
    if save is None or not hasattr(Policy, "load"):
        pytest.skip("advx.guard.Policy has no save/load in this tree yet (gcore's piece)")
    pol = Policy(min_confidence=0.3, model_fingerprint="f" * 64)
    path = tmp_path / "policy.toml"
    pol.save(path)
    r = CliRunner().invoke(cli, ["serve", "--model", "lenet", "--policy", str(path)])
    assert r.exit_code == 2, r.output
    assert "calibrated for" in r.output or "another model" in r.output


def test_advx_serve_wires_the_store_query_detection_and_api_keys(tmp_path, batch):
    pytest.importorskip("sqlalchemy")
    import advx
    from advx.errors import ModelError
    from advx.guard.store import Store

    db = f"sqlite:///{tmp_path / 'review.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "advx",
            "serve",
            "--model",
            "lenet",
            "--port",
            str(port),
            "--store",
            db,
            "--detect-queries",
            "reject",
            "--api-key",
            "k-123=team-a",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(proc, url)
        x = torch.rand(3, 1, 28, 28)
        assert httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).status_code == 401
        auth = {"Authorization": "Bearer k-123"}
        r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}, headers=auth)
        assert r.status_code == 200
        held = sum(d["action"] != "accept" for d in r.json()["decisions"])
        assert held > 0  # untrained lenet: nothing is confident
        # an attack's near-identical queries are caught and refused
        base = batch[0][0]
        g = torch.Generator().manual_seed(0)
        reasons = []
        for _ in range(30):
            q = (base + 0.02 * torch.rand(base.shape, generator=g)).clamp(0, 1)
            d = httpx.post(f"{url}/predict", json={"inputs": [q.tolist()]}, headers=auth).json()
            reasons.append(d["decisions"][0]["reasons"])
        assert ["query attack suspected"] in reasons
        # a black-box attack gets no scores for a caught query: it stops with a ModelError
        box = advx.BlackBox.from_http(f"{url}/predict", headers=auth, retries=0)
        with pytest.raises(ModelError):
            box.forward(base[None].clamp(0, 1))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    store = Store(db)
    try:
        items = store.list(status="queued", limit=1000)
        assert len(items) >= held
        assert any(i["client"] == "team-a" for i in items)
        assert store.alerts(client="team-a")
    finally:
        store.close()


@pytest.fixture(scope="module")
def guarded(trained_mlp):
    model = Classifier(trained_mlp, bounds=(0, 1))
    return Guard(
        model,
        detectors=[FeatureSqueezing(model)],
        policy=Policy(thresholds={"feature_squeezing": 0.5}, min_confidence=0.6),
        input_shape=(1, 28, 28),
    )


def test_guard_status_reports_versions_and_drift(guarded):
    with serve(create_app(guarded, name="m", expected_rates={"abstain": 0.02})) as url:
        r = CliRunner().invoke(cli, ["guard", "status", "--url", url])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["health"]["policy_hash"] == guarded.policy.hash
        assert doc["drift_alarms"] == []
        for _ in range(6):  # faint noise: abstained on far above the calibrated 2%
            httpx.post(
                f"{url}/predict", json={"inputs": (torch.rand(32, 1, 28, 28) * 0.2).tolist()}
            )
        r = CliRunner().invoke(cli, ["guard", "status", "--url", url])
        assert r.exit_code == 1, r.output
        assert json.loads(r.stdout)["drift_alarms"] == ["abstain"]
        assert "DRIFT" in r.stderr
    r = CliRunner().invoke(cli, ["guard", "status", "--url", url])
    assert r.exit_code == 2 and "cannot reach" in r.output


def test_guard_canary_attacks_the_live_guard(guarded, tmp_path):
    with serve(create_app(guarded, name="m")) as url:
        out = tmp_path / "canary.json"
        r = CliRunner().invoke(
            cli,
            ["guard", "canary", "--url", url, "-n", "12", "--queries", "150", "--out", str(out)],
        )
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert json.loads(out.read_text()) == doc and doc["time"]
        assert doc["clean_accepted_correct"] > 0
        assert doc["fooled_model"] > 0  # square at eps 0.3 fools an undefended MLP
        assert doc["caught"] + doc["evaded"] <= doc["fooled_model"]
        assert sum(doc["by_action"].values()) == doc["fooled_model"]
        assert doc["caught_rate"] == doc["caught"] / doc["fooled_model"]
        # the measured figure gates: a bar above it fails
        if doc["caught_rate"] < 1:
            r = CliRunner().invoke(
                cli,
                [
                    "guard",
                    "canary",
                    "--url",
                    url,
                    "-n",
                    "12",
                    "--queries",
                    "150",
                    "--fail-under",
                    "1.0",
                ],
            )
            assert r.exit_code == 1


def test_guard_canary_with_a_decision_based_attack(guarded):
    with serve(create_app(guarded, name="m")) as url:
        r = CliRunner().invoke(
            cli,
            [
                "guard",
                "canary",
                "--url",
                url,
                "--attack",
                "hopskipjump",
                "-n",
                "6",
                "--queries",
                "200",
            ],
        )
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["attack"] == "hopskipjump" and doc["clean_accepted_correct"] > 0
        assert doc["median_queries"] > 1  # it queried the live labels
        assert doc["caught"] + doc["evaded"] <= doc["fooled_model"]
