"""A production HTTP black box, against real servers on 127.0.0.1: the Open Inference Protocol
v2 (advx's own guard service, and a hand-written v2 app that rate-limits), Retry-After, headers
and a bearer token read from the environment."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
import torch
import torch.nn.functional as F

import advx
from advx.errors import InputError, ModelError
from advx.models.remote import parse_headers, retry_after_seconds

from .._server import serve

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

SHAPE = (1, 28, 28)


def _view(box, n):
    return advx.models.ModelView(box, advx.models.Tracker(n, torch.device("cpu")))


# ---------------------------------------------------------------------------------------------
# advx's guard service speaks v2: attack it unchanged, with the bearer key it requires


@pytest.fixture(scope="module")
def guard_url(trained_mlp):
    from advx.guard import Guard
    from advx.guard.service import create_app

    guard = Guard(advx.Classifier(trained_mlp, bounds=(0, 1)), input_shape=SHAPE)
    app = create_app(guard, name="mnist", batch_window_ms=1, api_keys={"s3cret-key": "alice"})
    with serve(app) as url:
        yield url


def test_v2_scores_from_the_guard_service_match_the_model(
    guard_url, trained_mlp, batch, monkeypatch
):
    x, _ = batch
    monkeypatch.setenv("ADVX_TEST_TOKEN", "s3cret-key")
    box = advx.BlackBox.from_http(
        guard_url, protocol="v2", model_name="mnist", token_env="ADVX_TEST_TOKEN", batch_size=9
    )
    view = _view(box, len(x))
    with torch.no_grad():
        probs = F.softmax(trained_mlp(x), dim=1)
    # the guard's first v2 output is the model's softmax scores
    assert torch.allclose(view.logits(x), probs, atol=1e-5)
    assert torch.equal(view.labels(x), probs.argmax(1))
    assert view.queries.tolist() == [2] * len(x)  # logits then labels: each input counted once


def test_v2_labels_from_a_named_output(guard_url, trained_mlp, batch, monkeypatch):
    x, _ = batch
    monkeypatch.setenv("ADVX_TEST_TOKEN", "s3cret-key")
    box = advx.BlackBox.from_spec(
        f"{guard_url}/",
        kind="labels",
        protocol="v2",
        model_name="mnist",
        output_name="predicted",
        token_env="ADVX_TEST_TOKEN",
        num_classes=10,
    )
    with torch.no_grad():
        assert torch.equal(_view(box, len(x)).labels(x), trained_mlp(x).argmax(1))


def test_a_score_attack_runs_over_v2_against_the_guard(guard_url, trained_mlp, batch):
    x, y = batch
    x, y = x[:8], y[:8]
    box = advx.BlackBox.from_http(
        guard_url, protocol="v2", model_name="mnist", headers={"Authorization": "Bearer s3cret-key"}
    )
    result = advx.attacks.create("square", advx.Linf(0.3), queries=40, seed=0)(box, x, y)
    assert int(result.queries.max()) <= 41 and int(result.queries.min()) >= 1
    with torch.no_grad():  # whatever it reports as broken really is broken on the model itself
        pred = trained_mlp(result.x_adv).argmax(1)
    assert torch.equal(pred != y, result.success)
    assert float((result.x_adv - x).abs().max()) <= 0.3 + 1e-6


def test_a_wrong_or_missing_token_is_a_clear_error(guard_url, batch, monkeypatch):
    x, _ = batch
    monkeypatch.setenv("ADVX_TEST_TOKEN", "wrong")
    box = advx.BlackBox.from_http(
        guard_url, protocol="v2", model_name="mnist", token_env="ADVX_TEST_TOKEN", retries=0
    )
    with pytest.raises(ModelError, match="401"):
        _view(box, len(x)).logits(x)
    monkeypatch.delenv("ADVX_TEST_TOKEN")
    with pytest.raises(InputError, match="ADVX_TEST_TOKEN is not set"):
        advx.BlackBox.from_http(
            guard_url, protocol="v2", model_name="mnist", token_env="ADVX_TEST_TOKEN"
        )


def test_a_wrong_model_name_or_output_says_what_came_back(guard_url, batch):
    x, _ = batch
    auth = {"Authorization": "Bearer s3cret-key"}
    box = advx.BlackBox.from_http(guard_url, protocol="v2", model_name="nope", headers=auth)
    with pytest.raises(ModelError, match="404"):
        _view(box, len(x)).logits(x)
    box = advx.BlackBox.from_http(
        guard_url, protocol="v2", model_name="mnist", headers=auth, output_name="logits"
    )
    with pytest.raises(ModelError, match="404.*logits.*is not an output"):  # the server's words
        _view(box, len(x)).logits(x)


# ---------------------------------------------------------------------------------------------
# a hand-written v2 server that rate-limits


def make_limited_app(net):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    log: dict[str, list] = {}

    async def infer(request):
        name = request.path_params["name"]
        seen = log.setdefault(name, [])
        seen.append((time.monotonic(), dict(request.headers)))
        k = len(seen)
        if name == "limited" and k <= 2:
            return JSONResponse(
                {"error": "slow down"}, status_code=429, headers={"Retry-After": "1"}
            )
        if name == "dated" and k == 1:
            when = datetime.now(timezone.utc) + timedelta(seconds=2)
            return JSONResponse(
                {"error": "busy"},
                status_code=503,
                headers={"Retry-After": format_datetime(when, usegmt=True)},
            )
        if name == "forever":
            return JSONResponse({"error": "quota"}, status_code=429, headers={"Retry-After": "120"})
        if name == "keyed" and request.headers.get("x-api-key") != "k1":
            return JSONResponse({"error": "bad key"}, status_code=403)
        doc = await request.json()
        t = doc["inputs"][0]
        log.setdefault("input names", []).append(t["name"])
        x = torch.tensor(t["data"], dtype=torch.float32).reshape(t["shape"])
        with torch.no_grad():
            z = net(x)
        # two outputs, labels first, nested data: the client must pick by name and reshape
        return JSONResponse(
            {
                "model_name": name,
                "outputs": [
                    {
                        "name": "label",
                        "datatype": "INT64",
                        "shape": [len(z)],
                        "data": z.argmax(1).tolist(),
                    },
                    {
                        "name": "logits",
                        "datatype": "FP32",
                        "shape": list(z.shape),
                        "data": z.tolist(),
                    },
                ],
            }
        )

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    app.state.log = log
    return app


@pytest.fixture(scope="module")
def limited(trained_mlp):
    app = make_limited_app(trained_mlp)
    with serve(app) as url:
        yield url, app.state.log


def test_429_waits_as_asked_and_counts_the_queries_once(limited, trained_mlp, batch):
    url, log = limited
    x, _ = batch
    box = advx.BlackBox.from_http(
        url, protocol="v2", model_name="limited", output_name="logits", retries=3, backoff=0.0
    )
    view = _view(box, len(x))
    with torch.no_grad():
        assert torch.allclose(view.logits(x), trained_mlp(x), atol=1e-5)
    times = [t for t, _ in log["limited"]]
    assert len(times) == 3  # two refusals, then the answer
    assert all(b - a >= 0.95 for a, b in zip(times, times[1:]))  # Retry-After: 1, honoured twice
    assert view.queries.tolist() == [1] * len(x)


def test_503_with_an_http_date_is_honoured(limited, trained_mlp, batch):
    url, log = limited
    x, _ = batch
    box = advx.BlackBox.from_http(
        f"{url}/v2/models/dated",
        protocol="v2",
        kind="labels",
        retries=1,
        backoff=0.0,
        num_classes=10,
    )
    with torch.no_grad():  # the label output comes first; it is the one read when none is named
        assert torch.equal(_view(box, len(x)).labels(x), trained_mlp(x).argmax(1))
    (t0, _), (t1, _) = log["dated"]
    assert t1 - t0 >= 0.9  # the date was 2 s ahead, to the second


def test_a_long_retry_after_is_capped_and_counted_against_the_retries(limited, batch):
    url, log = limited
    x, _ = batch
    box = advx.BlackBox.from_http(
        url, protocol="v2", model_name="forever", retries=2, max_retry_after=0.2
    )
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=r"3 attempt\(s\): rate limited \(429\).*wait 120s"):
        _view(box, len(x)).logits(x)
    assert time.monotonic() - t0 < 5  # not 240 s
    assert len(log["forever"]) == 3


def test_headers_are_sent_and_a_wrong_one_stops_at_once(limited, batch):
    url, log = limited
    x, _ = batch
    box = advx.BlackBox.from_spec(
        url,
        protocol="v2",
        model_name="keyed",
        input_name="INPUT__0",
        output_name="logits",
        headers={"X-Api-Key": "k1"},
    )
    assert _view(box, len(x)).logits(x).shape == (len(x), 10)
    assert log["keyed"][-1][1]["x-api-key"] == "k1"
    assert log["input names"][-1] == "INPUT__0"
    n = len(log["keyed"])
    box = advx.BlackBox.from_http(
        url, protocol="v2", model_name="keyed", headers=parse_headers(["X-Api-Key: k2"]), retries=3
    )
    with pytest.raises(ModelError, match="403.*bad key"):
        _view(box, len(x)).logits(x)
    assert len(log["keyed"]) == n + 1  # a 403 is not retried


def test_an_output_the_answer_lacks_is_named(limited, batch):
    url, _ = limited
    x, _ = batch
    box = advx.BlackBox.from_http(url, protocol="v2", model_name="plain", output_name="probs")
    with pytest.raises(ModelError, match="no output 'probs' \\(it has 'label', 'logits'\\)"):
        _view(box, len(x)).logits(x)


# ---------------------------------------------------------------------------------------------
# the pieces, without a server


def test_retry_after_values():
    now = 1_700_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 30, timezone.utc), usegmt=True)
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 1.5 ") == 1.5
    assert retry_after_seconds(date, now=now) == pytest.approx(30.0)
    assert retry_after_seconds(date, now=now + 100) == 0.0  # a date in the past: now
    assert retry_after_seconds("-4") == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds(None) is None


def test_header_and_token_options_are_checked(monkeypatch):
    assert parse_headers(["X-Api-Key: a:b", "X-Team:ml "]) == {"X-Api-Key": "a:b", "X-Team": "ml"}
    with pytest.raises(InputError, match="--header: expected NAME:VALUE"):
        parse_headers(["no-colon"])
    with pytest.raises(InputError, match="not a valid HTTP header name"):
        parse_headers(["bad name: x"])
    with pytest.raises(InputError, match="line breaks"):
        advx.BlackBox.from_http("http://127.0.0.1:1/p", headers={"X-A": "a\r\nX-B: b"})
    monkeypatch.setenv("ADVX_TEST_TOKEN", "t")
    with pytest.raises(InputError, match="Authorization header"):
        advx.BlackBox.from_http(
            "http://127.0.0.1:1/p", headers={"authorization": "x"}, token_env="ADVX_TEST_TOKEN"
        )
    box = advx.BlackBox.from_http("http://127.0.0.1:1/p", token_env="ADVX_TEST_TOKEN")
    assert box.fn.client.headers["authorization"] == "Bearer t"
    assert "Bearer" not in repr(box)
    with pytest.raises(InputError, match="model_name: protocol='v2' needs"):
        advx.BlackBox.from_http("http://127.0.0.1:1", protocol="v2")
    with pytest.raises(InputError, match="protocol: expected one of advx, v2"):
        advx.BlackBox.from_http("http://127.0.0.1:1", protocol="grpc")
    box = advx.BlackBox.from_http("http://h:1/v2/models/m/versions/3", protocol="v2")
    assert box.fn.__name__ == "http:http://h:1/v2/models/m/versions/3/infer"


def test_http_options_on_a_spec_that_is_not_a_url_are_refused():
    with pytest.raises(InputError, match="headers, protocol: only for a black box behind HTTP"):
        advx.BlackBox.from_spec("model.onnx", headers={"A": "b"}, protocol="v2")
    box = advx.BlackBox.from_spec("torch.nn:Identity", protocol="advx", headers=None)
    assert callable(box.fn)
