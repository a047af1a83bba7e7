"""Black boxes for real: an HTTP endpoint served on the loopback address, and an ONNX file."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

import advx
from advx.errors import AccessError, ModelError

from .._server import free_port, serve

httpx = pytest.importorskip("httpx")
starlette = pytest.importorskip("starlette")


def make_app(net):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    calls = {"flaky": 0}

    async def batch(request):
        doc = await request.json()
        return torch.tensor(doc["inputs"], dtype=torch.float32)

    async def scores(request):
        with torch.no_grad():
            return JSONResponse({"scores": net(await batch(request)).tolist()})

    async def labels(request):
        with torch.no_grad():
            return JSONResponse({"labels": net(await batch(request)).argmax(1).tolist()})

    async def slow(request):
        await asyncio.sleep(2.0)
        return await scores(request)

    async def error(request):
        return PlainTextResponse("boom", status_code=500)

    async def garbage(request):
        return PlainTextResponse("{not json", status_code=200)

    async def wrong_shape(request):
        x = await batch(request)
        return JSONResponse({"scores": [[0.0, 1.0, 2.0]] * len(x)})

    async def refused(request):  # an advx serve guard rejecting a row as a query attack
        x = await batch(request)
        labels = net(x).argmax(1).tolist()
        labels[0] = None
        reason = {"action": "reject", "label": None, "reasons": ["query attack suspected"]}
        return JSONResponse({"labels": labels, "decisions": [reason] * len(x)})

    async def flaky(request):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            return PlainTextResponse("try again", status_code=503)
        return await scores(request)

    routes = [
        Route(f"/{name}", fn, methods=["POST"])
        for name, fn in (
            ("scores", scores),
            ("labels", labels),
            ("slow", slow),
            ("error", error),
            ("garbage", garbage),
            ("wrong-shape", wrong_shape),
            ("flaky", flaky),
            ("refused", refused),
        )
    ]
    return Starlette(routes=routes)


@pytest.fixture(scope="module")
def server(trained_mlp):
    with serve(make_app(trained_mlp)) as url:
        yield url


def test_attack_a_model_behind_http(server, trained_mlp, batch):
    x, y = batch
    box = advx.BlackBox.from_http(f"{server}/labels", kind="labels", num_classes=10)
    with torch.no_grad():
        assert torch.equal(
            advx.models.ModelView(box, advx.models.Tracker(len(x), x.device)).labels(x),
            trained_mlp(x).argmax(1),
        )
    with pytest.raises(AccessError):
        advx.PGD(advx.Linf(0.1))(box, x, y)  # refused before any query: no gradients over HTTP


def test_scores_over_http_match_the_model(server, trained_mlp, batch):
    x, _ = batch
    box = advx.BlackBox.from_http(f"{server}/scores", batch_size=7)
    view = advx.models.ModelView(box, advx.models.Tracker(len(x), x.device))
    with torch.no_grad():
        assert torch.allclose(view.logits(x), trained_mlp(x), atol=1e-5)
    assert int(view.queries.sum()) == len(x)


@pytest.mark.parametrize(
    "route,message",
    [
        ("slow", "no answer within"),
        ("error", "server error 500"),
        ("garbage", "malformed JSON"),
        ("wrong-shape", "3 scores per input; expected 10"),
    ],
)
def test_a_misbehaving_server_stops_the_attack_with_a_clear_error(server, batch, route, message):
    x, y = batch
    box = advx.BlackBox.from_http(
        f"{server}/{route}",
        timeout=0.3,
        retries=1,
        backoff=0.01,
        num_classes=10,
    )
    with pytest.raises(ModelError, match=message) as info:
        _first_query(box, x, y)
    assert info.value.queries is not None and info.value.partial is not None


def test_inputs_a_guard_refused_are_named_with_its_reason(server, batch):
    x, _ = batch
    box = advx.BlackBox.from_http(f"{server}/refused", kind="labels", num_classes=10)
    view = advx.models.ModelView(box, advx.models.Tracker(len(x), x.device))
    with pytest.raises(ModelError, match=r"no label for 1 of .*query attack suspected"):
        view.labels(x)


def _first_query(box, x, y):
    """Run a score-based attack: its clean check is the first query."""
    advx.attacks.create(_score_attack(), advx.Linf(0.3))(box, x, y)


def _score_attack() -> str:
    names = [
        n
        for n in advx.attacks.list_attacks(access="scores", norm="linf")
        if advx.attacks.get(n).access == "scores"
    ]
    if not names:
        pytest.skip("no score-based Linf attack registered yet")
    return "square" if "square" in names else names[0]


def test_the_server_is_down(batch):
    x, y = batch
    box = advx.BlackBox.from_http(
        f"http://127.0.0.1:{free_port()}/scores", timeout=0.5, retries=1, backoff=0.01
    )
    with pytest.raises(ModelError, match="cannot connect"):
        _first_query(box, x, y)


def test_retries_with_backoff_get_through_a_passing_failure(server, batch, trained_mlp):
    x, _ = batch
    box = advx.BlackBox.from_http(f"{server}/flaky", retries=2, backoff=0.01)
    view = advx.models.ModelView(box, advx.models.Tracker(len(x), x.device))
    with torch.no_grad():
        assert torch.allclose(view.logits(x), trained_mlp(x), atol=1e-5)


def _failing_app(net, state):
    """Answers 503 to the first ``state["fail"]`` requests, then the scores; records when each
    request came (``state["times"]``)."""
    import time

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def scores(request):
        state["times"].append(time.monotonic())
        if len(state["times"]) <= state["fail"]:
            return PlainTextResponse("busy", status_code=503)
        doc = await request.json()
        with torch.no_grad():
            out = net(torch.tensor(doc["inputs"], dtype=torch.float32))
        return JSONResponse({"scores": out.tolist()})

    return Starlette(routes=[Route("/scores", scores, methods=["POST"])])


def _check_default_backoff(times: list[float]) -> None:
    """Three retries, 0.5 s before the first, doubling (0.5, 1, 2 s)."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3
    for gap, want in zip(gaps, (0.5, 1.0, 2.0)):
        assert want - 0.01 <= gap <= want + 0.45, f"waited {gaps}, expected 0.5, 1, 2 s"


def test_from_http_defaults_three_retries_half_a_second_backoff_ten_second_timeout(
    trained_mlp, batch
):
    x = batch[0][:2]
    state: dict[str, Any] = {"fail": 3, "times": []}
    with serve(_failing_app(trained_mlp, state)) as url:
        box = advx.BlackBox.from_http(f"{url}/scores")  # every retry setting at its default
        assert box.fn.client.timeout == httpx.Timeout(10.0)  # type: ignore[attr-defined]
        view = advx.models.ModelView(box, advx.models.Tracker(len(x), x.device))
        with torch.no_grad():  # fails three times, gets through on the last retry
            assert torch.allclose(view.logits(x), trained_mlp(x), atol=1e-5)
        _check_default_backoff(state["times"])
        state.update(fail=10**9, times=[])  # down for good: four attempts, no fifth
        with pytest.raises(ModelError, match="failed after 4 attempt"):
            box.fn(x)
        assert len(state["times"]) == 4


def test_http_fn_defaults_are_the_same(trained_mlp, batch):
    from advx.models.remote import http_fn

    state: dict[str, Any] = {"fail": 10**9, "times": []}
    with serve(_failing_app(trained_mlp, state)) as url:
        fn = http_fn(f"{url}/scores")
        assert fn.client.timeout == httpx.Timeout(10.0)  # type: ignore[attr-defined]
        with pytest.raises(ModelError, match="failed after 4 attempt"):
            fn(batch[0][:2])
        _check_default_backoff(state["times"])


def test_partial_results_and_spent_queries_are_kept(trained_mlp, batch):
    x, y = batch
    calls = {"n": 0}

    def dies_after_a_while(z):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionError("lost the connection")
        with torch.no_grad():
            return trained_mlp(z)

    with pytest.raises(ModelError, match="lost the connection") as info:
        advx.attacks.create(_score_attack(), advx.Linf(0.3))(
            advx.BlackBox(dies_after_a_while, batch_size=8), x, y
        )
    assert int(info.value.queries.sum()) >= len(x)
    assert info.value.partial is not None and len(info.value.partial) == len(x)


def test_onnx_file(tmp_path, trained_mlp, batch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    x, y = batch
    path = tmp_path / "mlp.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            trained_mlp,
            (x[:1],),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
        )
    box = advx.BlackBox.from_onnx(path)
    view = advx.models.ModelView(box, advx.models.Tracker(len(x), x.device))
    with torch.no_grad():
        assert torch.allclose(view.logits(x), trained_mlp(x), atol=1e-4)
    labels = advx.BlackBox.from_onnx(path, kind="labels")
    assert labels.access == "labels"
    with pytest.raises(AccessError):
        advx.FGSM(advx.Linf(0.1))(labels, x, y)


def test_a_callable_that_returns_nonsense(batch):
    x, y = batch
    with pytest.raises(ModelError, match="NaN"):
        _first_query(advx.BlackBox(lambda z: torch.full((len(z), 10), float("nan"))), x, y)
    with pytest.raises(ModelError, match="shape"):
        _first_query(advx.BlackBox(lambda z: torch.zeros(len(z))), x, y)
    with pytest.raises(advx.InputError, match="budget"):
        advx.BlackBox(lambda z: z, budget=0)


def test_the_command_line_attacks_an_http_endpoint(server, tmp_path):
    import json

    from click.testing import CliRunner

    from advx.cli import cli

    out = tmp_path / "adv.npz"
    attack = _score_attack()
    r = CliRunner().invoke(
        cli,
        [
            "attack",
            attack,
            "--blackbox",
            f"{server}/scores",
            "--budget",
            "400",
            "--n",
            "12",
            "--threat",
            "linf:0.3",
            "--out",
            str(out),
            "-p",
            _budget_param(attack, 300),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["grads"] == 0 and 12 <= summary["queries"] <= 12 * 400
    import numpy as np

    with np.load(out) as f:
        assert f["queries"].max() <= 400


def _budget_param(name: str, q: int) -> str:
    fields = advx.attacks.get(name).param_names()
    key = "queries" if "queries" in fields else "max_queries"
    return f"{key}={q}"
