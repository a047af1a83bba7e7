"""The query detector's state in a real Redis: shared by detectors, bounded, and a fallback when
Redis goes away."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import advx
from advx.errors import InputError
from advx.guard.queries import QueryDetector
from advx.models import BlackBox

from .._redis import redis_server
from .test_queries import Alerts, first_flag, guarded, patched

pytest.importorskip("redis")

KEY = b"a shared test key, 32 bytes long"


@pytest.fixture()
def server():
    with redis_server() as s:
        yield s


def attack_log(net, x, y, observe) -> list:
    """Runs a seeded Square (Linf 0.1) on one image; every query batch goes through
    ``observe(i, q)`` (i: the batch's number) first; returns the per-query (flagged, score)."""
    log: list = []
    calls = [0]

    def fn(q):
        calls[0] += 1
        log.extend(observe(calls[0], q))
        with torch.no_grad():
            return net(q)

    advx.Square(advx.Linf(0.1), queries=150, seed=3)(BlackBox(fn), x, y)
    return log


def test_square_attack_is_caught_through_redis(server, trained_mlp, batch):
    x, y = batch
    alerts = Alerts()
    det = QueryDetector(spec="mnist", state=server.url, alerts=alerts)
    caught = 0
    for i in range(4):
        log: list = []
        advx.Square(advx.Linf(0.1), queries=150, seed=i)(
            guarded(trained_mlp, det, f"a{i}", log), x[i : i + 1], y[i : i + 1]
        )
        if len(log) > 10:
            assert first_flag(log) is not None and first_flag(log) <= 36, log[:40]
            caught += 1
    assert caught >= 2 and len(alerts.seen) == caught
    assert not det.degraded
    st = det.stats()
    assert st["remembered"] > 0 and st["bytes"] > 0


def test_an_attack_split_over_two_detectors_is_caught_as_on_one(server, trained_mlp, batch):
    x, y = batch[0][5:6], batch[1][5:6]
    a = QueryDetector(spec="mnist", state=server.url, key=KEY, prefix="two:")
    b = QueryDetector(spec="mnist", state=server.url, key=KEY, prefix="two:")
    one = QueryDetector(spec="mnist", state=server.url, key=KEY, prefix="one:")
    # Two workers behind a load balancer, each query from a fresh account.
    split = attack_log(trained_mlp, x, y, lambda i, q: (a if i % 2 else b).observe(f"s{i}", q))
    single = attack_log(trained_mlp, x, y, lambda i, q: one.observe(f"s{i}", q))
    assert len(split) > 10
    assert split == single  # the same flags and scores, query for query
    assert first_flag(split) is not None and first_flag(split) <= 36
    # Without the shared state, neither worker alone sees enough of the attack this early.
    c = QueryDetector(spec="mnist", key=KEY)
    d = QueryDetector(spec="mnist", key=KEY)
    apart = attack_log(trained_mlp, x, y, lambda i, q: (c if i % 2 else d).observe(f"s{i}", q))
    first_apart = first_flag(apart)
    assert first_apart is None or first_apart > first_flag(split)


def test_another_process_shares_the_memory(server, mnist_test):
    x = mnist_test[0][:1]
    det = QueryDetector(spec="mnist", state=server.url, key=KEY)
    # a second worker process remembers the image ...
    code = (
        "import sys, torch\n"
        "from advx.data import load\n"
        "from advx.guard.queries import QueryDetector\n"
        "det = QueryDetector(spec='mnist', state=sys.argv[1], key=sys.argv[2].encode())\n"
        "out = det.observe('worker2', load('mnist-demo', split='test')[0][:1])\n"
        "assert out == [(False, 0.0)], out\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        [sys.executable, "-c", code, server.url, KEY.decode()], check=True, env=env, timeout=120
    )
    # ... and this one catches a near copy of it from another account
    [(flagged, score)] = det.observe("worker1-client", patched(x, 0))
    assert flagged and score > 0.5


def test_rate_limit_and_budget_are_shared_and_recover(server):
    a = QueryDetector(state=server.url, rate=20.0, burst=4, prefix="rl:")
    b = QueryDetector(state=server.url, rate=20.0, burst=4, prefix="rl:")
    assert a.admit("alice", 2) is None and b.admit("alice", 2) is None
    wait = a.admit("alice", 1)
    assert wait is not None and 0 < wait <= 0.05 + 1e-6
    assert b.admit("bob", 4) is None  # per client
    time.sleep(0.12)
    assert b.admit("alice", 1) is None
    budget_a = QueryDetector(state=server.url, budget=5, budget_period=3600.0, prefix="bud:")
    budget_b = QueryDetector(state=server.url, budget=5, budget_period=3600.0, prefix="bud:")
    assert budget_a.admit("carol", 3) is None and budget_b.admit("carol", 2) is None
    refused = budget_b.admit("carol", 1)
    assert refused is not None and 0 < refused <= 3600
    assert budget_a.admit("dave", 5) is None
    # a short period recovers
    short = QueryDetector(state=server.url, budget=2, budget_period=0.5, prefix="short:")
    assert short.admit("erin", 2) is None
    wait = short.admit("erin", 1)
    assert wait is not None
    time.sleep(wait + 0.05)
    assert short.admit("erin", 1) is None


def test_redis_memory_is_bounded(server, mnist_test):
    import redis

    det = QueryDetector(spec="mnist", state=server.url, capacity=40, client_capacity=10)
    det.observe("c", mnist_test[0][:200])
    r = redis.Redis.from_url(server.url)
    assert r.hlen("advx:q:g:ring") == 40
    buckets = list(r.scan_iter(match=b"advx:q:g:b:*", count=1000))
    fields = {f: v for k in buckets for f, v in r.hgetall(k).items()}
    postings = sum(len(v.split(b",")) for v in fields.values())
    assert 0 < postings <= 40 * 50  # only the last 40 queries stay indexed
    assert len(fields) <= 40 * 50 and len(buckets) <= 40 * 50 // 64 + 1
    assert det.stats()["remembered"] == 40
    # the oldest queries are forgotten: the first image's near copy is no longer matched
    assert not det.observe("fresh", patched(mnist_test[0][:1], 0))[0][0]


def test_redis_going_away_falls_back_and_comes_back(server, mnist_test, caplog):
    x = mnist_test[0]
    det = QueryDetector(spec="mnist", state=server.url, rate=1000.0, burst=100)
    det.state.retry = 0.2
    assert not det.observe("c", x[:1])[0][0]
    assert not det.degraded
    server.stop()  # Redis dies mid-run
    with caplog.at_level("WARNING"):
        out = det.observe("c", x[1:3])
    assert len(out) == 2 and det.degraded and det.stats()["degraded"]
    assert any("Redis" in r.getMessage() for r in caplog.records)
    # still detecting, from this process's memory, and still limiting
    assert det.observe("c", patched(x[1:2], 0))[0][0]
    assert det.admit("c", 50) is None
    # Redis comes back (empty): after the retry interval the shared state is used again
    server.start()
    time.sleep(0.25)
    det.observe("c", x[5:6])
    assert not det.degraded
    assert int(det.state.redis.get("advx:q:g:seq")) == 1


def test_unreachable_redis_is_a_clear_error():
    from tests._server import free_port

    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(InputError, match="cannot reach Redis") as e:
        QueryDetector(state=url)
    assert "s3cret" not in str(e.value) and "***" in str(e.value)


def test_a_worker_with_another_key_is_refused(server):
    QueryDetector(state=server.url, key=KEY, prefix="k:")
    with pytest.raises(InputError, match="key"):
        QueryDetector(state=server.url, key=b"another key", prefix="k:")
    # without a key, a worker adopts the shared one
    assert QueryDetector(state=server.url, prefix="k:")._key == KEY
