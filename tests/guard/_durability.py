"""The kill test's harness: a writer process queues items for review while 16 clients send
them; the writer is killed with SIGKILL mid-run; then every item it acknowledged must be in the
store, whole, exactly once, and the database must be consistent and still writable.

Shared by tests/guard/test_durability.py and benchmarks/bench_review.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# A writer that answers only after store.put returned: the service's contract with the queue
WRITER = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.concurrency import run_in_threadpool

from advx.guard.store import Store

store = Store(sys.argv[1], classes=10)

async def put(request: Request):
    items = (await request.json())["items"]
    await run_in_threadpool(store.put, items)
    return JSONResponse({"stored": len(items)})

async def health(request: Request):
    return JSONResponse({"ok": True})

app = Starlette(routes=[Route("/put", put, methods=["POST"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""

# The guard's own HTTP service (advx.guard.service) with the store as its review queue and a
# policy under which every input is held for review (no answer is ever confident enough)
SERVICE = """
import sys
import torch
import uvicorn

from advx.guard import Guard, Policy
from advx.guard.service import create_app
from advx.guard.store import Store

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
guard = Guard(net, policy=Policy(min_confidence=1.0), input_shape=(1, 28, 28), version="v1")
store = Store(sys.argv[1], classes=10)
app = create_app(guard, review=store, alerts=store)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


@dataclass
class KillResult:
    acknowledged: int
    stored: int
    sent: int
    missing: list[str]
    unknown: list[str]
    duplicates: int
    elapsed_s: float
    integrity: str
    errors: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.acknowledged / self.elapsed_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _input(client: int, n: int, j: int) -> np.ndarray:
    seed = (client * 1_000_003 + n) * 7 + j
    return np.random.default_rng(seed).random((1, 28, 28), dtype=np.float32)


def serve_takes_a_store() -> bool:
    """Whether ``advx serve`` has ``--store`` (then the kill test runs the command itself)."""
    from advx.cli.serve import serve_cmd

    return any("--store" in p.opts for p in serve_cmd.params)


def start_writer(url: str, *, cwd: Path, service: bool = False) -> tuple[subprocess.Popen, str]:
    """The writer process (its own Python) on a free port; waits until it answers.

    ``service``: ``advx serve --store URL`` when the command has the option (an untrained LeNet
    under the default policy abstains on every input, so every input goes to review), else the
    same app built from the library (:data:`SERVICE`)."""
    import httpx

    port = _free_port()
    if service and serve_takes_a_store():
        cmd = [sys.executable, "-m", "advx", "serve", "--model", "lenet", "--store", url]
        cmd += ["--port", str(port), "--log-level", "warning"]
    else:
        script = cwd / "writer.py"
        script.write_text(SERVICE if service else WRITER)
        cmd = [sys.executable, str(script), url, str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log = cwd / "writer.log"  # a file, not a pipe: an unread pipe that fills up blocks the writer
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the writer exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the writer did not start in 60 s")
        time.sleep(0.05)


def kill_test(
    url: str,
    *,
    cwd: Path,
    clients: int = 16,
    per_request: int = 2,
    kill_after: int = 200,
    max_s: float = 60.0,
    service: bool = False,
) -> KillResult:
    """Run the writer and ``clients`` concurrent clients; SIGKILL the writer once ``kill_after``
    items were acknowledged; check the store. The clients are still sending when it dies.

    ``service``: the writer is the guard's HTTP service (``POST /predict``, one input per
    request, its ``X-Request-Id`` the item's id); an answer whose decision is not ``accept``
    acknowledges that the input is in the review queue.
    """
    import httpx

    from advx.guard.store import Store

    if service:
        per_request = 1
    proc, base = start_writer(url, cwd=cwd, service=service)
    acked: dict[str, str] = {}  # request_id -> sha256 of the float32 bytes
    sent: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []

    def client(k: int) -> None:
        try:
            send(k)
        except Exception as e:  # anything but the writer going away fails the test, visibly
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    def send(k: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            n = 0
            while not stop.is_set():
                xs = [_input(k, n, j) for j in range(per_request)]
                ids = [f"c{k}-{n}-{j}" for j in range(per_request)]
                items = [
                    {
                        "input": x.tolist(),
                        "shape": [1, 28, 28],
                        "action": "abstain",
                        "label": None,
                        "predicted": k % 10,
                        "confidence": 0.5,
                        "scores": {"feature_squeezing": 0.9},
                        "reasons": ["feature_squeezing > 0.61"],
                        "model_version": "v1",
                        "policy_hash": "p",
                        "client": f"client-{k}",
                        "request_id": rid,
                        "time": time.time(),
                    }
                    for x, rid in zip(xs, ids)
                ]
                with lock:
                    sent.update(ids)
                try:
                    if service:
                        r = http.post(
                            "/predict",
                            json={"inputs": [xs[0].tolist()]},
                            headers={"X-Request-Id": ids[0], "X-Client-Id": f"client-{k}"},
                        )
                    else:
                        r = http.post("/put", json={"items": items})
                except httpx.HTTPError:
                    return  # the writer is gone: what it did not acknowledge may or may not be in
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    return
                if service and r.json()["decisions"][0]["action"] == "accept":
                    errors.append(f"accepted, so not queued: {r.text[:200]}")
                    return
                with lock:
                    for x, rid in zip(xs, ids):
                        acked[rid] = hashlib.sha256(x.tobytes()).hexdigest()
                n += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        while time.monotonic() - t0 < max_s:
            with lock:
                if len(acked) >= kill_after:
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the clients are still sending
        elapsed = time.monotonic() - t0
        proc.wait(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    for t in threads:
        t.join(timeout=60)
    # an answer read after the kill signal went out was still sent (so written) before the
    # process died: it counts as acknowledged
    with lock:
        acked_final = dict(acked)

    with Store(url) as store:  # a fresh open: recovers the WAL / the server's log
        rows: dict[str, str] = {}
        duplicates = 0
        query = "SELECT request_id, input, input_sha256 FROM review_items"
        with store._engine.connect() as conn:
            for rid, data, sha in conn.exec_driver_sql(query):
                duplicates += rid in rows
                digest = hashlib.sha256(bytes(data)).hexdigest()
                rows[rid] = digest if digest == sha else "bytes do not match their sha256"
        integrity = _integrity(store)
        # still writable after the crash
        store.put([{"input": [0.0], "action": "review", "request_id": "after-crash"}])
        if store.count() != len(rows) + duplicates + 1:
            integrity = "not writable after the crash"
    missing = sorted(r for r, h in acked_final.items() if rows.get(r) != h)
    unknown = sorted(set(rows) - sent)
    return KillResult(
        acknowledged=len(acked_final),
        stored=len(rows),
        sent=len(sent),
        missing=missing,
        unknown=unknown,
        duplicates=duplicates,
        elapsed_s=elapsed,
        integrity=integrity,
        errors=errors,
    )


def _integrity(store) -> str:
    import sqlalchemy as sa

    with store._engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            return str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())
        # PostgreSQL: amcheck verifies every B-tree index of the table against the heap
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS amcheck"))
        indexes = (
            conn.execute(
                sa.text(
                    "SELECT indexrelid::regclass::text FROM pg_index "
                    "WHERE indrelid = CAST(:t AS regclass)"
                ),
                {"t": "review_items"},
            )
            .scalars()
            .all()
        )
        for index in indexes:
            conn.execute(sa.text("SELECT bt_index_check(CAST(:i AS regclass), true)"), {"i": index})
        conn.commit()
        return "ok" if len(indexes) >= 4 else f"only {len(indexes)} indexes"
