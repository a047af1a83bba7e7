"""The update loop end to end on the embedded digits: a running service guards v0001 and queues
the adversarial digits it does not accept; a person labels them; the export fine-tunes a new
version that is audited against the old one and promoted -- or refused when it regresses -- and
the running service picks the promoted version up while a client keeps sending requests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import advx
from advx.guard import Guard
from advx.guard.reload import ModelDirReloader
from advx.guard.service import create_app
from advx.guard.store import Store
from advx.guard.update import init, update
from advx.guard.versions import ModelDir

from .._server import free_port, serve

SPEC = f"{Path(__file__).parent / '_loop_model.py'}:mlp"
THREAT = "linf:0.1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # two cores shared by many processes: torch's thread pool spinning makes tiny models 50x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def v1_model(trained_mlp):
    from advx.zoo import build

    net = build(SPEC)
    net.load_state_dict(trained_mlp.state_dict())
    return advx.Classifier(net.eval(), bounds=(0, 1))


def _held_out(mnist_test):
    x, y = mnist_test
    return (x[:400], y[:400]), (x[400:], y[400:])  # audit, calibration


def _queue(guard: Guard, store: Store, x_adv: torch.Tensor) -> int:
    """What the guard does not accept goes to the review queue, as the service queues it."""
    items = []
    for row, d in zip(x_adv, guard(x_adv), strict=True):
        if d.action == "accept":
            continue
        items.append(
            {
                "input": row,
                "shape": list(row.shape),
                "action": d.action,
                "label": d.label,
                "predicted": d.predicted,
                "confidence": d.confidence,
                "scores": dict(d.scores),
                "reasons": list(d.reasons),
                "model_version": d.model_version,
                "policy_hash": d.policy_hash,
                "client": "attacker",
            }
        )
    store.put(items)
    return len(items)


def _label_all(store: Store, truth: dict[bytes, int], *, wrong: bool = False) -> int:
    n = 0
    for item in store.list(status="queued", limit=1000):
        full = store.get(item["id"])
        y = truth[np.asarray(full["input"], dtype=np.float32).tobytes()]
        store.label(item["id"], (y + 1) % 10 if wrong else y, by="reviewer@example.org")
        n += 1
    return n


class Client(threading.Thread):
    """Keeps sending clean digits until stopped; records every answer's status and version."""

    def __init__(self, url: str, x: torch.Tensor) -> None:
        super().__init__(daemon=True)
        self.url, self.rows = url, x.tolist()
        self.answers: list[tuple[int, str | None]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(f"{self.url}/predict", json={"inputs": self.rows})
                    version = r.json().get("model_version") if r.status_code == 200 else None
                    self.answers.append((r.status_code, version))
                except httpx.HTTPError as e:  # a dropped connection is a failure too
                    self.errors.append(f"{type(e).__name__}: {e}")

    def versions(self) -> list[str | None]:
        return [v for _, v in self.answers]


def test_the_loop_through_a_running_service(tmp_path, v1_model, mnist_train, mnist_test):
    audit_set, calib_set = _held_out(mnist_test)
    md = ModelDir(tmp_path / "models")
    v1 = init(md, v1_model, data=calib_set, model_spec=SPEC, fpr=0.1)
    assert md.current() == "v0001" == v1.name
    store = Store(f"sqlite:///{tmp_path / 'review.db'}", classes=10)
    reloader = ModelDirReloader(md)
    app = create_app(
        reloader.load(), name="digits", review=store, reloader=reloader, admin_token="s3cret"
    )
    xs, ys = mnist_train
    x_att, y_att = xs[:300], ys[:300]
    with serve(app) as url:
        # 1. an attacker's adversarial digits reach the service; what it does not accept is queued
        x_adv = advx.PGD(advx.Linf(0.1), steps=10)(v1.model, x_att, y_att).x_adv
        r = httpx.post(f"{url}/predict", json={"inputs": x_adv.tolist()}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == "v0001"
        not_accepted = sum(d["action"] != "accept" for d in r.json()["decisions"])
        queued = store.count(status="queued")
        assert queued == not_accepted > 150  # most adversarial digits are not accepted
        # 2. a person labels them (here from the digits they were made from) and exports
        truth = {x_adv[k].numpy().tobytes(): int(y_att[k]) for k in range(len(x_att))}
        assert _label_all(store, truth) == queued
        assert store.export(tmp_path / "reviewed.npz")["items"] == queued

        # 3. the update: fine-tuned, audited against v0001, recalibrated, promoted
        train = (xs[300:2300], ys[300:2300])
        result = update(
            md,
            reviewed=tmp_path / "reviewed.npz",
            train_data=train,
            audit_data=audit_set,
            calib_data=calib_set,
            threat=THREAT,
            epochs=1,
            max_drop=0.02,
        )
        assert result.promoted, result.lines()
        assert result.version == "v0002" == md.current()
        assert result.new["reviewed_accuracy"] > result.old["reviewed_accuracy"] + 0.2
        assert result.new["robust_accuracy"] > result.old["robust_accuracy"]
        assert result.new["clean_accuracy"] >= result.old["clean_accuracy"] - 0.02
        v2 = md.load()
        assert v2.meta["parent"] == "v0001" and v2.meta["data"]["reviewed"]["n"] == queued
        labelled = [i["id"] for i in store.list(status="labelled", limit=1000)]
        assert v2.meta["data"]["reviewed"]["items"] == labelled  # which reviews made v0002
        assert v2.meta["audit"]["new"]["robust_accuracy"] == result.new["robust_accuracy"]
        # recalibrated for the new weights, to the same target
        assert v2.policy.model_fingerprint == v2.model.fingerprint() != v1.model.fingerprint()
        assert v2.policy.guarantees["fpr"]["target"] == 0.1

        # 4. the service picks v0002 up while a client keeps sending requests
        client = Client(url, mnist_test[0][:8])
        client.start()
        while len(client.answers) < 5 and not client.errors:
            time.sleep(0.01)
        denied = httpx.post(f"{url}/admin/reload", timeout=30)
        assert denied.status_code == 401 and denied.json()["field"] == "Authorization"
        wrong = httpx.post(
            f"{url}/admin/reload", headers={"Authorization": "Bearer guess"}, timeout=30
        )
        assert wrong.status_code == 403
        answer = httpx.post(
            f"{url}/admin/reload", headers={"Authorization": "Bearer s3cret"}, timeout=60
        ).json()
        assert answer["ok"] and answer["changed"], answer
        assert answer["version"] == "v0002" and answer["previous"] == "v0001"
        n_at_reload = len(client.answers)
        while len(client.answers) < n_at_reload + 5 and not client.errors:
            time.sleep(0.01)
        client.stop.set()
        client.join(timeout=30)
        assert client.errors == []
        assert {status for status, _ in client.answers} == {200}  # none failed
        seen = client.versions()
        assert seen[0] == "v0001" and seen[-1] == "v0002"
        k = seen.index("v0002")
        assert set(seen[:k]) == {"v0001"} and set(seen[k:]) == {"v0002"}  # one clean switch
        health = httpx.get(f"{url}/health").json()
        assert health["model_version"] == "v0002" and health["policy_hash"] == v2.policy.hash
        meta = httpx.get(f"{url}/v2/models/digits").json()
        assert meta["versions"] == ["1", "v0002"]
        assert "v0002" in httpx.get(f"{url}/openapi.json").text

        # 5. a careless reviewer labels the next batch wrongly: the fine-tune regresses, refused
        bad = Store(f"sqlite:///{tmp_path / 'review2.db'}", classes=10)
        x_adv2 = advx.PGD(advx.Linf(0.1), steps=10)(v2.model, x_att, y_att).x_adv
        queued2 = _queue(v2.guard(), bad, x_adv2)
        truth2 = {x_adv2[k].numpy().tobytes(): int(y_att[k]) for k in range(len(x_att))}
        assert _label_all(bad, truth2, wrong=True) == queued2 > 0
        bad.export(tmp_path / "wrong.npz")
        refused = update(
            md,
            reviewed=tmp_path / "wrong.npz",
            train_data=train,
            audit_data=audit_set,
            threat=THREAT,
            epochs=1,
            review_share=0.5,
            lr=3e-3,
            max_drop=0.02,
        )
        assert not refused.promoted and refused.version is None
        assert "clean accuracy dropped" in refused.reason
        assert refused.old["clean_accuracy"] - refused.new["clean_accuracy"] > 0.02
        assert md.current() == "v0002" and md.versions() == ["v0001", "v0002"]
        again = httpx.post(
            f"{url}/admin/reload", headers={"Authorization": "Bearer s3cret"}, timeout=60
        ).json()
        assert again["ok"] and not again["changed"] and again["version"] == "v0002"


def _two_versions(tmp_path, v1_model, mnist_test) -> ModelDir:
    """v0001 current, and a second model (v1's weights nudged) calibrated beside it."""
    _, calib_set = _held_out(mnist_test)
    md = ModelDir(tmp_path / "models")
    init(md, v1_model, data=calib_set, model_spec=SPEC, detectors="energy", fpr=0.1)
    net = advx.zoo.build(SPEC)
    net.load_state_dict(v1_model.net.state_dict())
    with torch.no_grad():
        net[3].bias.add_(0.01)
    guard = Guard(advx.Classifier(net.eval(), bounds=(0, 1)), detectors=[])
    guard.calibrate(*calib_set, fpr=0.1)
    md.add(guard.model, guard.policy, model_spec=SPEC, parent="v0001")
    return md


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name} in /metrics")


def test_a_promoted_version_that_fails_to_load_leaves_the_old_one_serving(
    tmp_path, v1_model, mnist_test, caplog
):
    caplog.set_level("INFO", logger="advx.guard.service")
    md = _two_versions(tmp_path, v1_model, mnist_test)
    # v0002 damaged after its promotion (a bad disk, a hand edit): the pointer names it
    md.promote("v0002")
    weights = next((md.root / "v0002").glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64])
    reloader = ModelDirReloader(md)
    app = create_app(reloader.load("v0001"), name="digits", reloader=reloader, admin_token="t")
    auth = {"Authorization": "Bearer t"}
    with serve(app) as url:
        client = Client(url, mnist_test[0][:4])
        client.start()
        answer = httpx.post(f"{url}/admin/reload", headers=auth, timeout=60)
        assert answer.status_code == 200
        doc = answer.json()
        assert not doc["ok"] and doc["version"] == "v0001" and doc["current"] == "v0002"
        assert "v0002 cannot be loaded" in doc["reason"]
        failed = [r for r in caplog.records if r.getMessage().startswith("reload failed")]
        assert (
            failed
            and failed[0].levelname == "ERROR"
            and "v0001 keeps serving" in (failed[0].getMessage())
        )
        n = len(client.answers)
        while len(client.answers) < n + 3 and not client.errors:
            time.sleep(0.01)
        client.stop.set()
        client.join(timeout=30)
        assert client.errors == [] and {s for s, _ in client.answers} == {200}
        assert set(client.versions()) == {"v0001"}
        metrics = httpx.get(f"{url}/metrics").text
        assert _metric(metrics, "advx_model_reload_failed") == 1.0
        assert 'advx_model_reloads_total{outcome="failed"} 1.0' in metrics
        # a good version promoted next is picked up, and the alarm clears
        shutil.rmtree(md.root / "v0002")
        shutil.copytree(md.root / "v0001", md.root / "v0003")
        meta = (md.root / "v0003" / "meta.json").read_text().replace('"v0001"', '"v0003"', 1)
        (md.root / "v0003" / "meta.json").write_text(meta)
        md.promote("v0003")
        doc = httpx.post(f"{url}/admin/reload", headers=auth, timeout=60).json()
        assert doc["ok"] and doc["version"] == "v0003"
        assert _metric(httpx.get(f"{url}/metrics").text, "advx_model_reload_failed") == 0.0
        # a service without a model directory says so
    with serve(create_app(reloader.load("v0001"), name="d", admin_token="t")) as url:
        r = httpx.post(f"{url}/admin/reload", headers=auth, timeout=30)
        assert r.status_code == 409 and "model directory" in r.json()["error"]
    with serve(create_app(reloader.load("v0001"), name="d", reloader=reloader)) as url:
        r = httpx.post(f"{url}/admin/reload", headers=auth, timeout=30)
        assert r.status_code == 403 and "no admin token" in r.json()["error"]


def test_advx_serve_model_dir_reloads_on_sighup(tmp_path, v1_model, mnist_test):
    md = _two_versions(tmp_path, v1_model, mnist_test)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(advx.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
        "ADVX_ADMIN_TOKEN": "from-env",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "advx", "serve", "--model-dir", str(md.root), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def version() -> str | None:
            try:
                return httpx.get(f"{url}/health", timeout=5).json()["model_version"]
            except httpx.HTTPError:
                return None

        deadline = time.monotonic() + 90
        while version() is None:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "advx serve did not start"
            time.sleep(0.2)
        assert version() == "v0001"
        md.promote("v0002")
        proc.send_signal(signal.SIGHUP)
        while version() != "v0002":
            assert proc.poll() is None and time.monotonic() < deadline, "no reload on SIGHUP"
            time.sleep(0.1)
        # the admin token came from the environment
        r = httpx.post(f"{url}/admin/reload", headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and r.json()["version"] == "v0002"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
