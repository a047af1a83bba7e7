"""Query-attack detection in the HTTP service: an attack over HTTP is refused, clients are told
apart by X-Client-Id or API key, and two ``advx serve`` processes share one Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import advx
from advx.cli import cli
from advx.errors import ModelError
from advx.guard import Guard
from advx.guard.queries import QueryDetector
from advx.guard.service import create_app
from advx.models import Classifier
from tests._redis import redis_server
from tests._server import free_port, serve, wait_until_up

from .test_queries import Alerts, patched

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

SHAPE = (1, 28, 28)
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


@pytest.fixture(scope="module")
def guard(trained_mlp):
    return Guard(Classifier(trained_mlp, bounds=(0, 1)), input_shape=SHAPE)


def predict(url: str, x: torch.Tensor, **headers: str) -> dict:
    r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_attack_over_http_is_refused_and_recorded(guard, batch, mnist_test):
    x, y = batch
    alerts = Alerts()
    det = QueryDetector(spec="mnist")
    app = create_app(guard, name="m", queries=det, alerts=alerts, batch_window_ms=0)
    with serve(app) as url:
        caught = set()
        for i in range(6):
            bb = advx.BlackBox.from_http(
                f"{url}/predict", headers={"X-Client-Id": f"mallory{i}"}, retries=0
            )
            try:
                r = advx.Square(advx.Linf(0.1), queries=200, seed=i)(bb, x[i : i + 1], y[i : i + 1])
            except ModelError:
                caught.add(f"mallory{i}")  # the service rejected a query: the attack ends
                continue
            assert int(r.queries[0]) <= 12, "an attack went on for long without being refused"
        assert len(caught) >= 3
        assert {c for c, _, _ in alerts.seen} == caught  # every refused attacker recorded
        # a benign client streaming distinct digits is not refused
        doc = predict(url, mnist_test[0][500:700], **{"X-Client-Id": "alice"})
        refused = [d for d in doc["decisions"] if "query attack suspected" in d["reasons"]]
        assert not refused
        # the flagged rows are in the metrics
        text = httpx.get(f"{url}/metrics").text
        assert "advx_guard_query_flags_total" in text


def test_silent_mode_answers_without_saying_why(guard, mnist_test):
    det = QueryDetector(spec="mnist")
    app = create_app(guard, name="m", queries=det, detect_queries="silent", batch_window_ms=0)
    with serve(app) as url:
        x = mnist_test[0][:1]
        predict(url, x, **{"X-Client-Id": "eve"})
        doc = predict(url, patched(x, 0), **{"X-Client-Id": "eve"})
        d = doc["decisions"][0]
        assert d["action"] != "reject" and "query attack suspected" not in d["reasons"]
        assert d["predicted"] is None  # not the model's answer
        assert det.flags == 1


def test_api_keys_name_the_client(guard, mnist_test):
    alerts = Alerts()
    det = QueryDetector(spec="mnist", budget=3)
    app = create_app(guard, name="m", queries=det, alerts=alerts, api_keys={"k-team-a": "team-a"})
    with serve(app) as url:
        x = mnist_test[0][:2]
        bb = advx.BlackBox.from_http(
            f"{url}/predict", headers={"Authorization": "Bearer k-team-a"}, retries=0
        )
        bb.scores(x)  # two inputs of a budget of three
        with pytest.raises(ModelError, match="429"):
            bb.scores(x)
        assert det.admit("team-a", 1) is None and det.admit("team-a", 1) is not None


def _serve(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "advx", "serve", "--model", "lenet", "--port", str(port), *extra],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # ~30 s of process start-up; test_queries_redis.py covers the sharing
def test_two_serve_processes_sharing_redis_catch_an_attack_spread_over_them(mnist_test):
    x = mnist_test[0][:1]
    with redis_server() as server:
        ports = [free_port(), free_port()]
        procs = [_serve(p, "--state", server.url) for p in ports]
        try:
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            for proc, url in zip(procs, urls, strict=True):
                wait_until_up(proc, url)
            first = predict(urls[0], x, **{"X-Client-Id": "sybil-1"})["decisions"][0]
            assert "query attack suspected" not in first["reasons"]
            # a near copy sent to the other process by another account is refused there
            second = predict(urls[1], patched(x, 0), **{"X-Client-Id": "sybil-2"})
            d = second["decisions"][0]
            assert d["action"] == "reject" and "query attack suspected" in d["reasons"]
            metrics = httpx.get(f"{urls[1]}/metrics").text
            assert "advx_guard_query_state_degraded 0.0" in metrics
            # Redis dies: both processes keep answering, and say so in their metrics
            server.stop()
            doc = predict(urls[0], mnist_test[0][3:4], **{"X-Client-Id": "sybil-3"})
            assert len(doc["decisions"]) == 1
            assert "advx_guard_query_state_degraded 1.0" in httpx.get(f"{urls[0]}/metrics").text
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_serve_refuses_bad_query_options():
    runner = CliRunner()
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    r = runner.invoke(cli, ["serve", "--model", "lenet", "--state", url])
    assert r.exit_code == 2 and "cannot reach Redis" in r.output and "pw@" not in r.output
    r = runner.invoke(cli, ["serve", "--model", "lenet", "--api-key", "nokey"])
    assert r.exit_code == 2 and "--api-key" in r.output
    r = runner.invoke(cli, ["serve", "--model", "lenet", "--detect-queries", "loud"])
    assert r.exit_code == 2


def test_the_query_options_build_the_monitor(mnist_test):
    from advx.cli.serve import build_queries, parse_api_keys
    from advx.errors import InputError

    assert build_queries({"detect_queries": "off"}, SHAPE) is None
    limits = build_queries({"detect_queries": "off", "query_budget": 5}, SHAPE)
    x = mnist_test[0][:1]
    limits.observe("c", x)
    assert limits.observe("c", patched(x, 0)) == [(False, 0.0)]  # nothing fingerprinted
    assert limits.admit("c", 5) is None and limits.admit("c", 1) is not None
    det = build_queries({"detect_queries": "silent"}, SHAPE)
    assert det.spec.window == 50 and det.observe("c", x) == [(False, 0.0)]
    assert det.observe("c", patched(x, 0))[0][0]
    with pytest.raises(InputError, match="too small"):
        build_queries({"detect_queries": "reject"}, (10,))
    assert parse_api_keys(["k1=alice", "k2 = bob"]) == {"k1": "alice", "k2": "bob"}
    assert parse_api_keys([]) is None
    with pytest.raises(InputError, match="KEY=CLIENT") as e:
        parse_api_keys(["secretkey"])
    assert "secretkey" not in str(e.value)  # a key is never echoed whole
