"""``advx review`` (list, show, label, export), ``advx guard alerts``, and the review page —
the page in a real headless Chromium: open it, click a label, find the label in the database."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from advx.cli import cli
from advx.data import load
from advx.guard.review_page import review_app, to_png
from advx.guard.store import Store

from .._postgres import skip_or_fail
from .._server import serve

CHROMIUM = os.environ.get("ADVX_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture()
def filled(tmp_path, mnist_test):
    """A store holding three real digits the guard held back, and one malformed row."""
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    x, y = mnist_test
    with Store(url, classes=10) as s:
        s.put(
            [
                {
                    "input": x[k].tolist(),
                    "shape": [1, 28, 28],
                    "action": action,
                    "label": None,
                    "predicted": int((y[k] + 1) % 10),
                    "confidence": 0.42,
                    "probs": _probs(int((y[k] + 1) % 10), int(y[k])),
                    "scores": {"feature_squeezing": 0.7 + k / 100},
                    "reasons": ["feature_squeezing > 0.61"],
                    "model_version": "lenet-v3",
                    "policy_hash": "ab12",
                    "client": f"client-{k}",
                    "request_id": f"req-{k}",
                    "time": 1_765_000_000 + k,
                }
                for k, action in enumerate(["abstain", "review", "reject"])
            ]
            + [{"input": "<script>alert(1)</script>", "action": "reject", "client": "<b>x</b>"}]
        )
        s.alert("mallory", 23, 0.97)
    return url, x[:3], y[:3]


def _probs(predicted: int, runner_up: int) -> list[float]:
    p = np.full(10, 0.03)
    p[predicted], p[runner_up] = 0.42, 0.34
    return (p / p.sum()).tolist()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_list_show_label_export(filled, tmp_path):
    url, x, y = filled
    code, out = run("review", "list", "--store", url)
    assert code == 0 and "abstain" in out and "client-2" in out
    code, out = run("review", "list", "--store", url, "--json")
    items = json.loads(out)
    assert [i["action"] for i in items] == ["abstain", "review", "reject", "reject"]
    assert "input" not in items[0] and items[0]["scores"] == {"feature_squeezing": 0.7}

    code, out = run("review", "show", str(items[0]["id"]), "--store", url)
    assert (
        code == 0
        and "lenet-v3" in out
        and "feature_squeezing" in out
        and "[1, 1, 28, 28]" not in out
    )
    assert "float32 [1, 28, 28]" in out
    code, out = run("review", "show", str(items[0]["id"]), "--store", url, "--json")
    shown = json.loads(out)
    assert np.array_equal(np.asarray(shown["input"], np.float32), x[0].numpy())

    code, out = run("review", "label", "1", "10", "--store", url)
    assert code == 2 and "label: expected a class in [0, 9]" in out
    code, out = run("review", "label", "99", "1", "--store", url)
    assert code == 2 and "no review item 99" in out
    for k in range(3):
        code, out = run(
            "review", "label", str(k + 1), str(int(y[k])), "--store", url, "--by", "ann"
        )
        assert code == 0 and f"labelled {int(y[k])} by ann" in out
    code, out = run("review", "list", "--store", url, "--status", "labelled", "--json")
    assert [(i["label"], i["labelled_by"]) for i in json.loads(out)] == [(int(v), "ann") for v in y]

    out_file = tmp_path / "labels.npz"
    code, out = run("review", "export", str(out_file), "--store", url)
    assert code == 0 and "wrote 3 labelled items" in out
    ex, ey = load(out_file)
    assert np.array_equal(ex.numpy(), x.numpy()) and ey.tolist() == y.tolist()
    before = out_file.read_bytes()
    code, out = run("review", "export", str(out_file), "--store", url)
    assert code == 2 and "exists; pass --force" in out and out_file.read_bytes() == before
    code, out = run("review", "export", str(out_file), "--store", url, "--force")
    assert code == 0


def test_guard_alerts(filled):
    url, _, _ = filled
    code, out = run("guard", "alerts", "--store", url)
    assert code == 0 and "mallory" in out and "23" in out
    code, out = run("guard", "alerts", "--store", url, "--json")
    (alert,) = json.loads(out)
    assert (alert["client"], alert["queries"], alert["score"]) == ("mallory", 23, 0.97)


def test_the_store_option_reads_the_environment_and_hides_passwords(filled, monkeypatch):
    url, _, _ = filled
    monkeypatch.setenv("ADVX_STORE", url)
    code, out = run("guard", "alerts", "--json")
    assert code == 0 and json.loads(out)[0]["client"] == "mallory"
    code, out = run("review", "list", "--store", "postgresql://u:hunter2@127.0.0.1:1/db")
    assert code == 2 and "hunter2" not in out and "u:***@127.0.0.1:1" in out


def test_the_page_and_its_api(filled):
    httpx = pytest.importorskip("httpx")
    url, _, y = filled
    with Store(url) as store, serve(review_app(store, by="ann")) as base:
        page = httpx.get(base + "/")
        assert page.status_code == 200
        assert page.text.count('<img alt="input of item') == 3  # the malformed row has none
        assert "<script>alert(1)</script>" not in page.text and "&lt;b&gt;x&lt;/b&gt;" in page.text
        assert page.text.count('name="label" value=') == 4 * 10
        bad = httpx.post(base + "/api/items/1/label", json={"label": 12})
        assert bad.status_code == 400 and bad.json()["field"] == "label"
        assert httpx.post(base + "/api/items/77/label", json={"label": 1}).status_code == 404
        as_json = {"content-type": "application/json"}
        assert (
            httpx.post(base + "/api/items/1/label", content=b"{", headers=as_json).status_code
            == 400
        )
        assert httpx.post(base + "/items/1/label", data={"label": "x"}).status_code == 400
        ok = httpx.post(base + "/api/items/1/label", json={"label": int(y[0]), "by": "bob"})
        assert ok.status_code == 200 and ok.json()["labelled_by"] == "bob"
        assert [i["id"] for i in httpx.get(base + "/api/items").json()] == [2, 3, 4]
        assert httpx.get(base + "/api/items?status=nope").status_code == 400
        # another site's page cannot label for the reviewer
        evil = {"Origin": "http://evil.example"}
        forged = httpx.post(base + "/items/2/label", data={"label": "1"}, headers=evil)
        assert forged.status_code == 403 and forged.json()["field"] == "origin"
        plain = httpx.post(
            base + "/api/items/2/label",
            content=b'{"label": 1}',
            headers={"content-type": "text/plain"},
        )
        assert plain.status_code == 415
        assert store.get(2)["status"] == "queued"
        same = httpx.post(base + "/items/2/label", data={"label": "1"}, headers={"Origin": base})
        assert same.status_code == 303 and store.get(2)["label"] == 1


def test_png_of_an_image_and_of_what_is_not_one():
    import io

    from PIL import Image

    png = to_png(np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(1, 28, 28))
    assert png is not None
    im = Image.open(io.BytesIO(png))
    assert im.size == (28, 28) and im.getpixel((0, 0)) == 0 and im.getpixel((27, 27)) == 255
    assert Image.open(io.BytesIO(to_png(np.zeros((3, 4, 5), np.float32)))).mode == "RGB"
    assert to_png(np.zeros((7,), np.float32)) is None and to_png([1, 2]) is None


def test_one_click_in_a_real_browser_labels_the_item(filled, tmp_path):
    """Chromium opens the page, clicks item 2's label button; the database has the label."""
    try:
        from playwright import sync_api
    except ImportError:
        skip_or_fail("needs playwright (pip install 'advx[test]')")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        skip_or_fail(f"no Chromium at {CHROMIUM} (install Debian's chromium or set ADVX_CHROMIUM)")
    url, _, y = filled
    with Store(url) as store, serve(review_app(store, by="ann")) as base:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                args=["--no-sandbox"],  # CI containers run as root
            )
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 900})
                page.goto(base + "/")
                item = page.locator("#item-2")
                assert item.locator("img").evaluate("im => im.naturalWidth") == 28
                assert item.locator(".predicted").inner_text() == str(int((y[1] + 1) % 10))
                page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
                with page.expect_navigation():
                    item.get_by_role("button", name=str(int(y[1])), exact=True).click()
                assert page.locator("#item-2").count() == 0  # it left the queue
                assert page.locator("#item-1").count() == 1
                with page.expect_navigation():
                    page.keyboard.press(str(int(y[0])))  # a key labels the item on top
                assert page.locator("#item-1").count() == 0
            finally:
                browser.close()
        row = store.get(2)
    assert (row["label"], row["labelled_by"], row["status"]) == (int(y[1]), "ann", "labelled")
    assert (store.get(1)["label"], store.get(1)["status"]) == (int(y[0]), "labelled")
    assert store.get(3)["status"] == "queued"
    if os.environ.get("ADVX_REVIEW_SCREENSHOT"):
        shutil.copy(tmp_path / "review.png", os.environ["ADVX_REVIEW_SCREENSHOT"])


def test_review_serve_starts_the_page(filled, tmp_path):
    """`advx review serve` as a user runs it: a process that serves the page for the store."""
    import subprocess
    import sys
    import time

    import httpx

    from .._server import free_port

    url, _, _ = filled
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "advx", "review", "serve", "--store", url, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "advx review serve did not answer in 90 s"
                time.sleep(0.1)
        assert page.status_code == 200 and 'id="item-1"' in page.text
        rebound = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "evil.example"})
        assert rebound.status_code == 400
        r = httpx.post(f"http://127.0.0.1:{port}/items/1/label", data={"label": "4"})
        assert r.status_code == 303
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with Store(url) as store:
        assert store.get(1)["label"] == 4
