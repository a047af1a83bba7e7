"""The review queue's durability and write throughput (issue 14): SQLite (WAL) and PostgreSQL.

1. The kill test, repeated: the guard's HTTP service (``advx serve --store URL``, or the same
   app built with ``advx.guard.service.create_app`` where the command lacks ``--store``, with
   the store as its review queue and every input held for review) receives MNIST-sized inputs
   from 16 concurrent HTTP clients and is killed with SIGKILL once ``--kill-after`` items were
   acknowledged; then the acknowledged items are looked up in the store (request id and sha256
   of the float32 bytes). ``--writer minimal``
   uses a bare Starlette app that calls ``Store.put`` instead (2 items per request).
2. ``Store.put`` alone: 16 threads, each putting batches of 2 items for ``--seconds``.

PostgreSQL is a throw-away server started by tests/_postgres.py (Debian's binaries).

    python benchmarks/bench_review.py --repeats 3 --write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import ROOT, machine, table, versions, write_section

sys.path.insert(0, str(ROOT))  # the kill-test harness and the PostgreSQL helper live in tests/
from advx.guard.store import Store
from tests._postgres import postgres_server
from tests.guard._durability import kill_test, serve_takes_a_store


def put_throughput(url: str, *, threads: int, seconds: float, per_put: int = 2) -> float:
    """Items per second that ``threads`` threads put into one store, one transaction per put."""
    rng = np.random.default_rng(0)
    x = rng.random((1, 28, 28), dtype=np.float32).tolist()
    item = {"input": x, "shape": [1, 28, 28], "action": "abstain", "predicted": 1,
            "confidence": 0.5, "scores": {"fs": 0.9}, "reasons": ["fs > 0.6"],
            "model_version": "v1", "policy_hash": "p", "client": "bench"}  # fmt: skip
    done = [0] * threads
    stop = threading.Event()
    with Store(url, classes=10) as store:

        def worker(k: int) -> None:
            while not stop.is_set():
                store.put([dict(item, request_id=f"{k}-{done[k]}-{j}") for j in range(per_put)])
                done[k] += per_put

        pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        t0 = time.monotonic()
        for t in pool:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in pool:
            t.join()
        return sum(done) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kill-after", type=int, default=600)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--writer", choices=["service", "minimal"], default="service")
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = ap.parse_args()

    service = args.writer == "service"
    kill_rows, put_rows, summary = [], [], []
    for backend in ("sqlite", "postgresql"):
        speeds, acked_total, stored_total, missing_total = [], 0, 0, 0
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                if backend == "sqlite":
                    url = f"sqlite:///{Path(tmp) / 'guard.db'}"
                    res = kill_test(url, cwd=Path(tmp), clients=args.clients,
                                    kill_after=args.kill_after, service=service)  # fmt: skip
                else:
                    with postgres_server(dbname=f"bench{r}") as url:
                        res = kill_test(url, cwd=Path(tmp), clients=args.clients,
                                        kill_after=args.kill_after, service=service)  # fmt: skip
            found = res.acknowledged - len(res.missing)
            print(backend, r, res, f"{res.items_per_s:.1f} items/s", flush=True)
            kill_rows.append([backend, r + 1, res.sent, res.acknowledged, found, res.stored,
                              len(res.missing), res.duplicates, res.integrity,
                              round(res.items_per_s, 1)])  # fmt: skip
            speeds.append(res.items_per_s)
            acked_total += res.acknowledged
            stored_total += found
            missing_total += len(res.missing)
        summary.append([backend, args.repeats, acked_total, stored_total, missing_total,
                        round(statistics.median(speeds), 1)])  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            if backend == "sqlite":
                speed = put_throughput(f"sqlite:///{Path(tmp) / 'guard.db'}",
                                       threads=args.clients, seconds=args.seconds)  # fmt: skip
            else:
                with postgres_server(dbname="put") as url:
                    speed = put_throughput(url, threads=args.clients, seconds=args.seconds)
        print(backend, "Store.put", f"{speed:.1f} items/s", flush=True)
        put_rows.append([backend, args.clients, 2, round(speed, 1)])

    cmd = "python benchmarks/bench_review.py " + " ".join(sys.argv[1:])
    if service and serve_takes_a_store():
        writer = (
            "`advx serve --model lenet --store URL` (an untrained LeNet under the default policy "
            "abstains on every input, so every input goes to the review queue; one input per "
            "`POST /predict`, its `X-Request-Id` the item's id; answered only after `Store.put` "
            "returned)"
        )
    elif service:
        writer = (
            "The guard's HTTP service (`advx.guard.service.create_app`, the app `advx serve` "
            "runs; a linear MNIST model, a policy that holds every input for review, the store "
            "as its review queue; one input per `POST /predict`, its `X-Request-Id` the item's "
            "id; answered only after `Store.put` returned)"
        )
    else:
        writer = (
            "A bare writer process (Starlette + uvicorn, 2 items per request, answering only "
            "after `Store.put` returned)"
        )
    md = f"""## Guard: review queue durability (issue 14)

{writer} receives MNIST-sized inputs (float32 1x28x28 as JSON) from
{args.clients} concurrent HTTP clients and is killed with SIGKILL once {args.kill_after} items
were acknowledged, the clients still sending. Then the store is opened
afresh and every acknowledged item is looked up by request id and sha256 of its float32 bytes;
the database is checked (SQLite `PRAGMA integrity_check`; PostgreSQL `amcheck` on every index
of the table) and written to once more. SQLite: WAL, `synchronous=FULL`; PostgreSQL 15
(Debian's binaries, a throw-away server on 127.0.0.1, default `synchronous_commit=on`).
{machine()}, loaded by other jobs. Versions: {versions("sqlalchemy", "alembic", "psycopg")}.

Command: `{cmd}`

Per run (acknowledged: answered 200 to a client; found: of those, in the store with the same
bytes; stored: all rows, including requests in flight when the writer died):

{
        table(
            [
                "backend",
                "run",
                "sent",
                "acknowledged",
                "found",
                "stored",
                "missing",
                "duplicates",
                "integrity",
                "items/s (acknowledged)",
            ],
            kill_rows,
        )
    }

Summary (items/s: median over the runs, acknowledged items over the time from the first
request to the kill, {args.clients} writers through HTTP):

{
        table(
            [
                "backend",
                "runs",
                "acknowledged",
                "found after kill -9",
                "missing",
                "items/s (median)",
            ],
            summary,
        )
    }

`Store.put` alone (no HTTP, no JSON), one transaction per put, {args.seconds:g} s:

{table(["backend", "threads", "items per put", "items/s"], put_rows)}

The HTTP figure counts the whole path: the clients (16 threads in one Python process, each
building and JSON-encoding 784 floats per item), uvicorn, the JSON parsing (and, for the
service, validation, the model and the policy), then the commit; `Store.put` alone shows what
the database itself takes.
"""
    print(md)
    if args.write:
        write_section("guard-review", md)


if __name__ == "__main__":
    main()
