"""The guard's HTTP service, served for real by uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import advx
from advx.defenses import FeatureSqueezing
from advx.errors import InputError, ModelError
from advx.guard import Guard, Policy
from advx.guard.service import JsonLogFormatter, create_app
from advx.models import Classifier
from tests._server import free_port, serve, wait_until_up

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

SHAPE = (1, 28, 28)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(trained_mlp):
    return Classifier(trained_mlp, bounds=(0, 1))


@pytest.fixture(scope="module")
def guard(model):
    # a clean digit is confident; squeezing flags little on clean data at this threshold
    return Guard(
        model,
        detectors=[FeatureSqueezing(model)],
        policy=Policy(thresholds={"feature_squeezing": 0.8}, min_confidence=0.6),
        input_shape=SHAPE,
    )


@pytest.fixture(scope="module")
def url(guard):
    with serve(create_app(guard, name="mnist", batch_window_ms=20)) as base:
        yield base


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = m.group(2) or ""
        if all(f'{k}="{v}"' in got for k, v in labels.items()) or not want:
            total += float(m.group(3))
    return total


def healthy(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    x = torch.rand(1, *SHAPE)
    assert httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).status_code == 200


# -- the advx protocol ----------------------------------------------------------------------------


def test_predict_answers_the_model_and_the_guard(url, model, guard, batch):
    x, y = batch
    x = x[:6]
    r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}, headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-1"
    doc = r.json()
    with torch.no_grad():
        probs = torch.softmax(model.scores(x), 1)
    assert torch.allclose(torch.tensor(doc["scores"]), probs, atol=1e-5)
    assert doc["labels"] == probs.argmax(1).tolist()
    local = guard(x)
    assert [d["action"] for d in doc["decisions"]] == local.actions
    assert [d["label"] for d in doc["decisions"]] == local.labels
    assert doc["policy_hash"] == guard.policy.hash
    assert "feature_squeezing" in doc["decisions"][0]["scores"]


def test_a_bad_row_is_refused_beside_good_ones(url):
    good = torch.rand(*SHAPE).tolist()
    r = httpx.post(f"{url}/predict", json={"inputs": [good, [[1.0, 2.0]], good]})
    assert r.status_code == 200
    doc = r.json()
    d = doc["decisions"]
    assert [x["action"] for x in d][1] == "reject"
    assert "shape" in d[1]["reasons"][0]
    assert doc["scores"][1] is None and doc["labels"][1] is None
    assert doc["scores"][0] is not None and doc["scores"][2] is not None


def test_a_request_id_is_made_when_none_or_a_bad_one_comes(url):
    r = httpx.get(f"{url}/health", headers={"X-Request-Id": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


HOSTILE = {
    "empty": (b"", "application/json"),
    "whitespace": (b"   \n", "application/json"),
    "truncated": (b'{"inputs": [[[0.1, 0.2', "application/json"),
    "not an object": (b"[1, 2, 3]", "application/json"),
    "no inputs": (b'{"x": 1}', "application/json"),
    "inputs a string": (b'{"inputs": "hello"}', "application/json"),
    "inputs an object": (b'{"inputs": {"a": [1]}}', "application/json"),
    "inputs empty": (b'{"inputs": []}', "application/json"),
    "wrong nesting": (b'{"inputs": [[[[[[1]]]]]]}', "application/json"),
    "scalar rows": (b'{"inputs": [1, 2, 3]}', "application/json"),
    "strings in rows": (b'{"inputs": [["a", "b"]]}', "application/json"),
    "1e309": (b'{"inputs": [[1e309]]}', "application/json"),
    "NaN": (b'{"inputs": [[NaN]]}', "application/json"),
    "-Infinity": (b'{"inputs": [[-Infinity]]}', "application/json"),
    "huge int": (b'{"inputs": [[' + b"9" * 5000 + b"]]}", "application/json"),
    "deep nesting": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    "many rows": (b'{"inputs": [' + b",".join([b"[0]"] * 5000) + b"]}", "application/json"),
    "wrong content type": (b'{"inputs": [[0.5]]}', "text/plain"),
    "form": (b"inputs=1", "application/x-www-form-urlencoded"),
    "non-UTF-8": (b'{"inputs": "\xff\xfe\xfa"}', "application/json"),
    "UTF-16": ('{"inputs": [[0.5]]}'.encode("utf-16"), "application/json"),
    "null": (b"null", "application/json"),
    "out of bounds": (json.dumps({"inputs": [np.full(SHAPE, 7.0).tolist()]}).encode(), None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bodies_get_a_4xx_naming_the_field(url, case):
    body, ctype = HOSTILE[case]
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(f"{url}/predict", content=body, headers=headers)
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    doc = r.json()
    assert doc["error"] and doc["field"] and doc["request_id"] == r.headers["x-request-id"]
    assert doc.get("expected")


def test_server_is_healthy_after_hostile_bodies(url):
    for body, ctype in HOSTILE.values():
        httpx.post(f"{url}/predict", content=body, headers={"content-type": ctype or "x/y"})
    healthy(url)
    assert metric(url, "advx_requests_total", status="500") == 0


def _raw(url: str, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out or not re.search(rb"\r\n\r\n.*\}", out, re.S):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_an_oversized_body_is_refused_before_it_is_read(guard):
    app = create_app(guard, name="m", max_body_bytes=40_000)
    with serve(app) as url:
        # Content-Length says a gigabyte; nothing of it is sent: the answer must not wait for it
        t0 = time.monotonic()
        head = (
            "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\n\r\n"
        )
        out = _raw(url, head.encode())
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert time.monotonic() - t0 < 5
        assert b'"field":"body"' in out

        # chunked, with no length announced: refused once the limit is crossed
        def chunks():
            for _ in range(100):
                yield b"[" * 1000

        r = httpx.post(
            f"{url}/predict", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["field"] == "body"
        healthy(url)


def test_unknown_paths_and_methods_answer_json(url):
    r = httpx.get(f"{url}/nowhere")
    assert r.status_code == 404 and r.json()["field"] == "path"
    r = httpx.get(f"{url}/predict")
    assert r.status_code == 405 and r.json()["field"] == "method"


# -- Open Inference Protocol v2 -------------------------------------------------------------------


def test_v2_json_tensors(url, model):
    x = torch.rand(3, *SHAPE)
    body = {
        "id": "q1",
        "inputs": [
            {
                "name": "input",
                "shape": [3, *SHAPE],
                "datatype": "FP32",
                "data": x.reshape(-1).tolist(),
            }
        ],
    }
    r = httpx.post(f"{url}/v2/models/mnist/infer", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "q1" and doc["model_name"] == "mnist"
    out = {o["name"]: o for o in doc["outputs"]}
    scores = np.asarray(out["scores"]["data"], dtype=np.float32).reshape(out["scores"]["shape"])
    with torch.no_grad():
        probs = torch.softmax(model.scores(x), 1).numpy()
    np.testing.assert_allclose(scores, probs, atol=1e-5)
    decisions = json.loads(doc["parameters"]["decisions"])
    assert [d["action"] for d in decisions] == out["action"]["data"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": []}, "inputs"),
        (
            {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": [0]}]},
            "inputs[0].shape",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [2, *SHAPE], "datatype": "FP32", "data": [0.5]}
                ]
            },
            "inputs[0].data",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, *SHAPE], "datatype": "BYTES", "data": ["a"]}
                ]
            },
            "inputs[0].datatype",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [10**9, *SHAPE], "datatype": "FP32", "data": [0]}
                ]
            },
            "inputs[0].shape",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 784}
                ],
                "outputs": [{"name": "logits"}],
            },
            "outputs[0].name",
        ),
    ],
)
def test_v2_malformed_requests_name_the_field(url, body, field):
    r = httpx.post(f"{url}/v2/models/mnist/infer", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field


def test_v2_metadata_and_health(url, guard):
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{url}/v2/models/mnist").json()
    assert meta["inputs"][0]["shape"] == [-1, *SHAPE]
    assert meta["outputs"][0] == {"name": "scores", "datatype": "FP32", "shape": [-1, 10]}
    assert httpx.get(f"{url}/v2/models/mnist/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/other/ready").status_code == 404
    assert httpx.get(f"{url}/v2").json()["extensions"] == ["binary_tensor_data"]


def test_tritonclient_calls_the_guarded_model(url, model, guard, batch):
    th = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    client = th.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.get_model_metadata("mnist")["inputs"][0]["datatype"] == "FP32"
    x = batch[0][:5].numpy()
    with torch.no_grad():
        probs = torch.softmax(model.scores(torch.from_numpy(x)), 1).numpy()
    local = guard(torch.from_numpy(x))
    for binary in (True, False):  # binary tensor extension (the default) and JSON
        inp = th.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [
            th.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "label", "action")
        ]
        res = client.infer("mnist", [inp], outputs=outs)
        np.testing.assert_allclose(res.as_numpy("scores"), probs, atol=1e-5)
        assert [a.decode() if isinstance(a, bytes) else a for a in res.as_numpy("action")] == (
            local.actions
        )
        labels = res.as_numpy("label").tolist()
        assert labels == [-1 if v is None else v for v in local.labels]
        decisions = json.loads(res.get_response()["parameters"]["decisions"])
        assert [d["action"] for d in decisions] == local.actions
    res = client.infer("mnist", [inp])  # no outputs named: all of them, binary
    assert res.as_numpy("confidence").shape == (5,)
    bad = th.InferInput("input", [1, 3, 28, 28], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("mnist", [bad])
    client.close()


# -- batching, metrics, logs ----------------------------------------------------------------------


def test_concurrent_requests_are_merged_into_batches(url):
    before_n = metric(url, "advx_batch_size_count")
    before_rows = metric(url, "advx_batch_size_sum")
    x = torch.rand(1, *SHAPE).tolist()
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.post(f"{url}/predict", json={"inputs": x}, timeout=30).status_code,
                range(48),
            )
        )
    assert codes == [200] * 48
    passes = metric(url, "advx_batch_size_count") - before_n
    rows = metric(url, "advx_batch_size_sum") - before_rows
    assert rows == 48
    assert passes < 48, "no two requests shared a model pass"


def test_no_batching_runs_one_request_per_pass(guard):
    with serve(create_app(guard, name="m", max_batch=1)) as url:
        x = torch.rand(1, *SHAPE).tolist()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: httpx.post(f"{url}/predict", json={"inputs": x}), range(16)))
        assert metric(url, "advx_batch_size_count") == 16
        assert metric(url, "advx_batch_size_sum") == 16


def test_metrics_follow_the_traffic(url, batch):
    x = batch[0][:4]
    accepted = metric(url, "advx_guard_decisions_total", action="accept")
    ok = metric(url, "advx_requests_total", endpoint="predict", status="200")
    bad = metric(url, "advx_requests_total", endpoint="predict", status="400")
    score_n = metric(url, "advx_guard_detector_score_count", detector="feature_squeezing")
    r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()})
    n_acc = sum(d["action"] == "accept" for d in r.json()["decisions"])
    httpx.post(f"{url}/predict", content=b"{", headers={"content-type": "application/json"})
    assert metric(url, "advx_guard_decisions_total", action="accept") == accepted + n_acc
    assert metric(url, "advx_requests_total", endpoint="predict", status="200") == ok + 1
    assert metric(url, "advx_requests_total", endpoint="predict", status="400") == bad + 1
    assert (
        metric(url, "advx_guard_detector_score_count", detector="feature_squeezing") == score_n + 4
    )
    text = httpx.get(f"{url}/metrics").text
    assert "advx_model_info{" in text and "advx_request_seconds_bucket" in text


def test_logs_are_json_with_the_request_id(url, caplog):
    caplog.set_level("INFO", logger="advx.guard.service")
    httpx.get(f"{url}/health", headers={"X-Request-Id": "trace-42"})
    records = [r for r in caplog.records if r.name == "advx.guard.service"]
    assert records
    doc = json.loads(JsonLogFormatter().format(records[-1]))
    assert doc["request_id"] == "trace-42" and doc["status"] == 200 and doc["endpoint"] == "health"
    x = torch.rand(1, *SHAPE).tolist()
    httpx.post(f"{url}/predict", json={"inputs": x}, headers={"X-Client-Id": "carol"})
    last = [r for r in caplog.records if r.name == "advx.guard.service"][-1]
    doc = json.loads(JsonLogFormatter().format(last))
    assert doc["client"] == "carol" and doc["endpoint"] == "predict"


# -- plug points ----------------------------------------------------------------------------------


class Budget:
    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.seen: list[tuple[str, int]] = []
        self.flag_above = 2.0
        self.lock = threading.Lock()

    def admit(self, client, n):
        with self.lock:
            self.seen.append((client, n))
            used = sum(k for c, k in self.seen if c == client)
        return None if used <= self.allow else 2.5

    def observe(self, client, x):
        # a stand-in detector: a row whose mean is above 0.9 "is" an attack query
        return [(bool(m > 0.9), float(m)) for m in x.mean(dim=(1, 2, 3))]


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.items: list[dict] = []
        self.alerts: list[tuple] = []
        self.fail = fail

    def put(self, items):
        if self.fail:
            raise OSError("disk full")
        self.items.extend(items)

    def alert(self, client, queries, score):
        self.alerts.append((client, queries, score))


def test_query_budget_answers_429_with_retry_after(guard):
    budget = Budget(allow=3)
    with serve(create_app(guard, name="m", queries=budget)) as url:
        x = torch.rand(2, *SHAPE).tolist()
        h = {"X-Client-Id": "alice"}
        assert httpx.post(f"{url}/predict", json={"inputs": x}, headers=h).status_code == 200
        r = httpx.post(f"{url}/predict", json={"inputs": x}, headers=h)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.json()["retry_after_s"] == 2.5
        # another client is not affected
        assert (
            httpx.post(
                f"{url}/predict", json={"inputs": x}, headers={"X-Client-Id": "bob"}
            ).status_code
            == 200
        )
        assert ("alice", 2) in budget.seen and ("bob", 2) in budget.seen
        assert metric(url, "advx_guard_rate_limited_total") == 1


@pytest.mark.parametrize("mode", ["reject", "silent"])
def test_query_attack_rows_are_rejected_or_answered_silently(guard, mode):
    sink = Sink()
    app = create_app(
        guard, name="m", queries=Budget(10**6), alerts=sink, review=sink, detect_queries=mode
    )
    with serve(app) as url:
        attack_row = torch.full(SHAPE, 0.95)
        clean_row = torch.zeros(SHAPE)
        r = httpx.post(
            f"{url}/predict",
            json={"inputs": [clean_row.tolist(), attack_row.tolist()]},
            headers={"X-Client-Id": "mallory"},
        )
        assert r.status_code == 200
        doc = r.json()
        d = doc["decisions"][1]
        if mode == "reject":
            assert d["action"] == "reject" and d["reasons"] == ["query attack suspected"]
            assert doc["scores"][1] is None
        else:
            assert d["action"] == "abstain" and d["reasons"] == [] and d["predicted"] is None
            assert doc["scores"][1] == pytest.approx([0.1] * 10)
        assert doc["decisions"][0]["reasons"] != ["query attack suspected"]
        assert (
            sink.alerts
            and sink.alerts[0][0] == "mallory"
            and sink.alerts[0][2] == pytest.approx(0.95)
        )
        queued = [i for i in sink.items if i["reasons"] == ["query attack suspected"]]
        assert len(queued) == 1 and queued[0]["client"] == "mallory"
        assert queued[0]["request_id"] == r.headers["x-request-id"]
        assert metric(url, "advx_guard_query_flags_total") == 1


def test_review_queue_gets_items_before_the_answer(guard, model):
    sink = Sink()
    with serve(create_app(guard, name="m", review=sink)) as url:
        x = torch.rand(6, *SHAPE) * 0.2  # faint noise, no digit: mostly not accepted
        r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()})
        held = [i for i, d in enumerate(r.json()["decisions"]) if d["action"] != "accept"]
        assert held
        assert len(sink.items) == len(held)  # already there when the answer arrived
        item = sink.items[0]
        assert set(item) >= {
            "input",
            "shape",
            "action",
            "label",
            "predicted",
            "confidence",
            "scores",
            "reasons",
            "model_version",
            "policy_hash",
            "client",
            "request_id",
            "time",
        }
        assert item["shape"] == list(SHAPE)
        assert torch.allclose(torch.tensor(item["input"]), x[held[0]])
        assert item["client"] == "127.0.0.1"
    with serve(create_app(guard, name="m", review=Sink(fail=True))) as url:
        r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()})
        assert r.status_code == 503 and "review queue" in r.json()["error"]


def test_api_keys(guard):
    budget = Budget(10**6)
    app = create_app(guard, name="m", api_keys={"s3cret": "team-a"}, queries=budget)
    with serve(app) as url:
        x = torch.rand(1, *SHAPE).tolist()
        r = httpx.post(f"{url}/predict", json={"inputs": x})
        assert r.status_code == 401 and r.json()["field"] == "Authorization"
        r = httpx.post(f"{url}/predict", json={"inputs": x}, headers={"Authorization": "Bearer no"})
        assert r.status_code == 401
        r = httpx.post(
            f"{url}/predict",
            json={"inputs": x},
            headers={"Authorization": "Bearer s3cret", "X-Client-Id": "spoof"},
        )
        assert r.status_code == 200 and budget.seen[-1] == ("team-a", 1)


class Slow(nn.Module):
    def __init__(self, net: nn.Module, seconds: float) -> None:
        super().__init__()
        self.net, self.seconds = net, seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.net(x)


def test_a_slow_model_times_out_with_503(trained_mlp):
    g = Guard(Classifier(Slow(trained_mlp, 0.0), bounds=(0, 1)), input_shape=SHAPE)
    with serve(create_app(g, name="m", timeout_s=0.3)) as url:
        g.model.net.seconds = 1.0  # slow only after the start-up check
        r = httpx.post(f"{url}/predict", json={"inputs": torch.rand(1, *SHAPE).tolist()})
        assert r.status_code == 503 and "no answer within" in r.json()["error"]
        g.model.net.seconds = 0.0
        time.sleep(1.2)  # the abandoned pass finishes; the next request is served again
        healthy(url)


def test_create_app_refuses_what_cannot_serve(model):
    with pytest.raises(InputError, match="input shape"):
        create_app(Guard(model))
    with pytest.raises(InputError, match="cannot run"):
        create_app(Guard(model, input_shape=(3, 32, 32)))
    with pytest.raises(InputError, match="detect_queries"):
        create_app(Guard(model, input_shape=SHAPE), detect_queries="loud")


# -- attacks and fuzzing --------------------------------------------------------------------------


def test_a_black_box_attack_runs_against_predict(url, batch):
    x, y = batch[0][:4], batch[1][:4]
    before = metric(url, "advx_requests_total", endpoint="predict", status="200")
    bb = advx.BlackBox.from_http(f"{url}/predict", kind="scores", timeout=30)
    res = advx.Square(advx.Linf(0.3), queries=150)(bb, x, y)
    assert bool(res.success.any())
    assert (res.x_adv - x).abs().max() <= 0.3 + 1e-6
    sent = metric(url, "advx_requests_total", endpoint="predict", status="200") - before
    assert sent >= res.queries.max().item() / 1  # every query went through the service
    labels = advx.BlackBox.from_http(f"{url}/predict", kind="labels").labels(res.x_adv)
    assert (labels[res.success] != y[res.success]).all()


def test_a_blocked_attacker_gets_a_model_error(guard, batch):
    budget = Budget(allow=20)
    with serve(create_app(guard, name="m", queries=budget)) as url:
        bb = advx.BlackBox.from_http(f"{url}/predict", kind="scores", retries=0)
        with pytest.raises(ModelError, match="429"):
            advx.Square(advx.Linf(0.3), queries=100)(bb, batch[0][:4], batch[1][:4])


def test_schemathesis_finds_no_server_error():
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import checks as C

    # a tiny input (1, 3, 3) so the fuzzer's bodies stay small and fast to generate
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 3))
    g = Guard(Classifier(net, bounds=(0, 1)), input_shape=(1, 3, 3))
    with serve(create_app(g, name="tiny", batch_window_ms=0)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        seen: dict[int, int] = {}
        checks = [
            C.not_a_server_error,
            C.status_code_conformance,
            C.content_type_conformance,
            C.response_schema_conformance,
        ]
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in schemathesis.GenerationMode:

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=10,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def run(case):
                    resp = case.call(base_url=url, timeout=10)
                    seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
                    case.validate_response(resp, checks=checks)

                try:
                    run()
                except Unsatisfiable:  # an operation without inputs has no negative case
                    assert mode == schemathesis.GenerationMode.NEGATIVE
        assert not any(code >= 500 for code in seen), seen
        assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if 400 <= k < 500) > 0
        healthy_tiny = httpx.post(f"{url}/predict", json={"inputs": [[[[0.5] * 3] * 3]]})
        assert healthy_tiny.status_code == 200


# -- shutdown -------------------------------------------------------------------------------------

_SERVER = """
import sys, time, torch, uvicorn
from torch import nn
from advx.guard import Guard
from advx.guard.service import create_app
from advx.models import Classifier

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.delay = 0.0
    def forward(self, x):
        time.sleep(self.delay)
        return self.lin(x.flatten(1))

net = Slow()
app = create_app(Guard(Classifier(net, bounds=(0, 1)), input_shape=(4,)), name="slow")
net.delay = 1.5
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            timeout_graceful_shutdown=20)
"""


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(_SERVER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, timeout=60)
        result: dict = {}

        def call():
            r = httpx.post(f"{url}/predict", json={"inputs": [[0.1, 0.2, 0.3, 0.4]]}, timeout=30)
            result["status"], result["doc"] = r.status_code, r.json()

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the request is inside the model now
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result.get("status") == 200, result
        assert len(result["doc"]["decisions"]) == 1
        # uvicorn re-raises the signal once it has drained, so the exit is "killed by SIGTERM"
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.TransportError):  # and it no longer listens
            httpx.get(f"{url}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_one_model_pass_per_batch(trained_mlp):
    from tests.conftest import CountingNet

    net = CountingNet(trained_mlp)
    g = Guard(Classifier(net, bounds=(0, 1)), input_shape=SHAPE)
    with serve(create_app(g, name="m")) as url:
        net.reset()  # the start-up check ran the model once
        x = torch.rand(3, *SHAPE)
        doc = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).json()
        # the answer's scores are the probabilities the guard decided on, not a second pass
        assert net.forward_rows == 3
        with torch.no_grad():
            probs = torch.softmax(trained_mlp(x), 1)
        assert torch.allclose(torch.tensor(doc["scores"]), probs, atol=1e-5)
    assert "score" not in vars(g)  # the guard is left as it was


def test_compressed_bodies_as_tritonclient_sends_them(guard, model):
    import gzip

    th = pytest.importorskip("tritonclient.http")
    with serve(create_app(guard, name="mnist", max_body_bytes=200_000)) as url:
        client = th.InferenceServerClient(url.removeprefix("http://"))
        x = torch.rand(2, *SHAPE).numpy()
        with torch.no_grad():
            probs = torch.softmax(model.scores(torch.from_numpy(x)), 1).numpy()
        for algo in ("gzip", "deflate"):
            inp = th.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            res = client.infer("mnist", [inp], request_compression_algorithm=algo)
            np.testing.assert_allclose(res.as_numpy("scores"), probs, atol=1e-5)
        client.close()
        h = {"content-type": "application/json", "content-encoding": "gzip"}
        body = json.dumps({"inputs": x.tolist()}).encode()
        r = httpx.post(f"{url}/predict", content=gzip.compress(body), headers=h)
        assert r.status_code == 200 and len(r.json()["decisions"]) == 2
        # a small bomb: 1 MB of zeros in about 1 kB is refused once 200 kB have come out
        bomb = gzip.compress(b'{"inputs": [' + b" " * 1_000_000 + b"]}")
        assert len(bomb) < 5_000
        r = httpx.post(f"{url}/predict", content=bomb, headers=h)
        assert r.status_code == 413 and r.json()["field"] == "body"
        for bad in (b"not gzip at all", gzip.compress(body)[:-20]):
            r = httpx.post(f"{url}/predict", content=bad, headers=h)
            assert r.status_code == 400 and r.json()["field"] == "Content-Encoding"
        r = httpx.post(f"{url}/predict", content=body, headers={**h, "content-encoding": "br"})
        assert r.status_code == 415
        healthy(url)
