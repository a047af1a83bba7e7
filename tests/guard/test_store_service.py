"""The store behind the guard's real HTTP service: what a client sends and the guard holds back
arrives in the queue bit for bit, is labelled on the review page's API and exported as a data
set equal to what was sent; a query attack the service catches is an alert `advx guard alerts`
shows."""

from __future__ import annotations

import json

import httpx
import numpy as np
import torch
from click.testing import CliRunner

from advx.cli import cli
from advx.data import load
from advx.guard import Guard
from advx.guard.queries import QueryDetector
from advx.guard.review_page import review_app
from advx.guard.service import create_app
from advx.guard.store import Store

from .._server import serve


def test_held_back_inputs_go_from_the_service_to_a_data_set(tmp_path, mnist_test):
    x, y = mnist_test
    x, y = x[:5], y[:5]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    guard = Guard(net, input_shape=(1, 28, 28), version="v-test")  # untrained: it abstains
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    with Store(url, classes=10) as store:
        app = create_app(guard, review=store, alerts=store)
        with serve(app) as base:
            r = httpx.post(
                base + "/predict", json={"inputs": x.tolist()}, headers={"X-Client-Id": "alice"}
            )
            assert r.status_code == 200
            assert [d["action"] for d in r.json()["decisions"]] == ["abstain"] * 5
        items = store.list()
        assert [i["client"] for i in items] == ["alice"] * 5
        assert {i["model_version"] for i in items} == {"v-test"}
        assert {i["request_id"] for i in items} == {r.headers["X-Request-Id"]}
        for i, item in enumerate(items):  # the JSON round trip loses nothing
            assert store.get(item["id"])["input"].tobytes() == x[i].numpy().tobytes()
        with serve(review_app(store, by="ann")) as base:
            for item, label in zip(items, y.tolist()):
                done = httpx.post(f"{base}/api/items/{item['id']}/label", json={"label": label})
                assert done.status_code == 200
        store.export(tmp_path / "reviewed.npz")
    ex, ey = load(tmp_path / "reviewed.npz")
    assert torch.equal(ex, x) and torch.equal(ey, y)


def test_a_caught_query_attack_is_an_alert(tmp_path, mnist_test):
    x, _ = mnist_test
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    guard = Guard(net, input_shape=(1, 28, 28))
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    rng = np.random.default_rng(0)
    with Store(url, classes=10) as store:
        app = create_app(guard, alerts=store, queries=QueryDetector(spec="mnist"))
        with serve(app) as base, httpx.Client(base_url=base) as http:
            for k in range(4):  # a benign client: distinct digits
                http.post(
                    "/predict", json={"inputs": [x[k].tolist()]}, headers={"X-Client-Id": "bob"}
                )
            rejected = 0
            for _ in range(30):  # an attack: the same digit, nudged a little each query
                probe = (x[7].numpy() + rng.normal(0, 0.01, x[7].shape)).clip(0, 1)
                r = http.post(
                    "/predict", json={"inputs": [probe.tolist()]}, headers={"X-Client-Id": "eve"}
                )
                rejected += r.json()["decisions"][0]["action"] == "reject"
        assert rejected > 0
    code = CliRunner().invoke(cli, ["guard", "alerts", "--store", url, "--json"])
    alerts = json.loads(code.output)
    assert alerts and {a["client"] for a in alerts} == {"eve"}
    assert all(2 <= a["queries"] <= 30 and a["score"] > 0 for a in alerts)
