"""Stateful query-attack detection, rate limits and budgets, in one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import advx
from advx.data import load
from advx.errors import InputError
from advx.guard.queries import (
    Fingerprinter,
    FingerprintSpec,
    Memory,
    QueryDetector,
    preset_for,
)
from advx.models import BlackBox


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Alerts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, float]] = []

    def alert(self, client: str, queries: int, score: float) -> None:
        self.seen.append((client, queries, score))


def guarded(net, det: QueryDetector, client: str, log: list, kind: str = "scores") -> BlackBox:
    """The model as a black box whose every query batch goes through ``det.observe`` first."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        log.extend(det.observe(client, x))
        with torch.no_grad():
            z = net(x)
        return z if kind == "scores" else z.argmax(1)

    return BlackBox(fn, kind=kind)


def patched(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with one 3x3 patch inverted (where depends on ``k``): a typical attack step."""
    out = x.clone()
    r, c = 6 + 3 * (k % 5), 6 + 3 * (k // 5 % 5)
    out[..., r : r + 3, c : c + 3] = 1 - out[..., r : r + 3, c : c + 3]
    return out


def first_flag(log: list) -> int | None:
    return next((i + 1 for i, (flagged, _) in enumerate(log) if flagged), None)


def test_square_attack_is_caught_within_a_few_dozen_queries(trained_mlp, batch):
    x, y = batch
    alerts = Alerts()
    det = QueryDetector(spec="mnist", alerts=alerts)
    attack = advx.Square(advx.Linf(0.1), queries=300)
    firsts, long_runs = [], 0
    for i in range(8):
        log: list = []
        box = guarded(trained_mlp, det, f"attacker{i}", log)
        r = attack.with_seed(i)(box, x[i : i + 1], y[i : i + 1])
        if len(log) <= 10:  # fooled almost at once: too short to say anything
            continue
        long_runs += 1
        first = first_flag(log)
        assert first is not None, f"image {i}: {len(log)} queries, none flagged"
        firsts.append(first)
        # once caught, an attack that keeps going keeps being flagged
        if len(log) - first >= 30:
            flagged = sum(f for f, _ in log[first:])
            assert flagged >= 0.8 * (len(log) - first), (flagged, len(log), first)
        assert r.queries[0] == len(log)
    assert long_runs >= 4
    assert max(firsts) <= 36, firsts
    # one alert per attacking client, with its query count at detection and its score
    clients = {c for c, _, _ in alerts.seen}
    assert len(clients) == long_runs == len(alerts.seen)
    for _c, q, s in alerts.seen:
        assert q in firsts and 0.5 < s <= 1.0


def test_distinct_clean_images_are_not_flagged(mnist_train, mnist_test):
    x = torch.cat([mnist_test[0], mnist_train[0]])  # the 5,000 embedded digits, all distinct
    det = QueryDetector(spec="mnist", capacity=10_000)
    flags = 0
    for i in range(0, len(x), 250):
        flags += sum(f for f, _ in det.observe("benign", x[i : i + 250]))
    assert flags <= 5, f"{flags} of {len(x)} distinct clean images flagged (> 0.1%)"
    assert det.stats()["remembered"] == len(x)


def test_retries_are_not_evidence_but_near_duplicates_are(mnist_test):
    x = mnist_test[0][:20]
    det = QueryDetector(spec="mnist")
    det.observe("c", x)
    # sending the very same image again (a client retry) is not flagged
    assert det.observe("c", x[-1:]) == [(False, 0.0)]
    # a copy shifted by one pixel shares most of its windows: Blacklight flags it, and so do we
    shifted = torch.roll(x[:5], shifts=1, dims=3)
    out = det.observe("c", shifted)
    assert all(f for f, _ in out), out
    # from another client, too: the global memory is account-oblivious
    assert all(f for f, _ in det.observe("sybil", torch.roll(x[5:8], shifts=1, dims=2)))


def test_an_attack_split_over_clients_is_caught_by_the_global_memory(trained_mlp, batch):
    x, y = batch
    det = QueryDetector(spec="mnist", client_capacity=2)
    log: list = []
    count = [0]

    def fn(q):
        count[0] += 1
        log.extend(det.observe(f"sybil{count[0]}", q))  # a fresh account for every query
        with torch.no_grad():
            return trained_mlp(q)

    advx.Square(advx.Linf(0.1), queries=200)(BlackBox(fn), x[:1], y[:1])
    assert len(log) > 10 and first_flag(log) is not None and first_flag(log) <= 36


def test_the_client_memory_catches_what_other_clients_flushed(mnist_test):
    x = mnist_test[0]
    det = QueryDetector(spec="mnist", capacity=50, client_capacity=100)
    det.observe("attacker", x[:1])
    det.observe("others", x[100:300])  # 200 queries flush the global memory of 50
    noisy = patched(x[:1], 0)
    [(flagged, score)] = det.observe("attacker", noisy)
    assert flagged and score > 0.5
    # the same query from a fresh account is not caught: its own memory is empty, the global
    # one has forgotten the original
    fresh = QueryDetector(spec="mnist", capacity=50, client_capacity=100, key=det._key)
    fresh.observe("attacker", x[:1])
    fresh.observe("others", x[100:300])
    assert not fresh.observe("someone", noisy)[0][0]


def test_memory_is_bounded_and_forgets_old_queries():
    rng = np.random.default_rng(0)
    mem = Memory(500, posting_cap=64)
    first = np.sort(rng.integers(1, 2**63, size=50, dtype=np.uint64))
    mem.add(first)
    assert mem.best(first) == 50
    peak = 0
    for _ in range(5000):
        mem.add(np.sort(rng.integers(1, 2**63, size=50, dtype=np.uint64)))
        peak = max(peak, mem.nbytes)
    assert len(mem) == 500
    assert mem.best(first) == 0  # evicted
    # 16 bytes per remembered hash; the runs waiting to merge add at most one spill's worth
    assert peak <= 16 * 50 * (500 + 64 + 500), peak
    assert mem.nbytes <= 16 * 50 * (500 + 64 + 500)


def test_bytes_per_query_and_stats(mnist_test):
    det = QueryDetector(spec="mnist", client_capacity=10)
    det.observe("c", mnist_test[0][:300])
    st = det.stats()
    assert st["remembered"] == 300 and st["flags"] == 0 and not st["degraded"]
    assert 0 < st["bytes_per_query"] <= 16 * 50 * 1.1


def test_rate_limit_refuses_and_recovers():
    clock = Clock()
    det = QueryDetector(rate=2.0, burst=4, clock=clock)
    assert [det.admit("a", 1) for _ in range(4)] == [None] * 4
    wait = det.admit("a", 1)
    assert wait == pytest.approx(0.5)
    assert det.admit("b", 4) is None  # buckets are per client
    clock.t += 0.5
    assert det.admit("a", 1) is None
    assert det.admit("a", 2) == pytest.approx(1.0)
    # a batch bigger than the burst waits for a full bucket, then leaves it in debt
    clock.t += 2.0
    assert det.admit("a", 10) is None
    assert det.admit("a", 1) == pytest.approx((1 + 6) / 2.0)


def test_budget_refuses_until_the_next_period():
    clock = Clock()
    det = QueryDetector(budget=10, budget_period=100.0, clock=clock)
    clock.t = 1010.0
    assert det.admit("a", 6) is None
    assert det.admit("a", 4) is None
    assert det.admit("a", 1) == pytest.approx(90.0)
    assert det.admit("other", 10) is None
    clock.t = 1100.0
    assert det.admit("a", 10) is None


def test_alerts_cool_down_and_a_failing_store_does_not_break_serving(mnist_test):
    clock = Clock()
    x = mnist_test[0][:3]
    alerts = Alerts()
    det = QueryDetector(spec="mnist", alerts=alerts, alert_cooldown=60, clock=clock)
    det.observe("a", x)
    for k in range(3):
        det.observe("a", patched(x[:1], k))
    assert [(c, q) for c, q, _ in alerts.seen] == [("a", 4)]
    clock.t += 61
    det.observe("a", patched(x[:1], 3))
    assert [(c, q) for c, q, _ in alerts.seen] == [("a", 4), ("a", 7)]

    class Broken:
        def alert(self, client, queries, score):
            raise RuntimeError("database is down")

    det2 = QueryDetector(spec="mnist", alerts=Broken())
    det2.observe("a", x[:1])
    assert det2.observe("a", patched(x[:1], 0))[0][0]


def test_fingerprints_are_keyed_and_shaped():
    x = load("mnist-demo", split="test")[0][:4]
    spec = preset_for((1, 28, 28))
    assert spec.window == 50 and preset_for((3, 32, 32)).window == 20
    assert preset_for((3, 224, 224)).step == 25
    a, b = Fingerprinter(spec, key=b"k1"), Fingerprinter(spec, key=b"k2")
    fa, fb = a(x), b(x)
    assert fa.shape == (4, 50) and fa.dtype == np.uint64
    assert np.array_equal(fa, Fingerprinter(spec, key=b"k1")(x))
    assert len(np.intersect1d(fa[0], fb[0])) == 0  # another key, other hashes
    blank = a(torch.zeros(1, 1, 28, 28))
    assert (blank != 0).sum() == 1  # one distinct window: padded with zeros
    assert QueryDetector(spec="mnist").observe("c", torch.zeros(2, 1, 28, 28))[1] == (False, 0.0)


def test_bad_arguments_are_named():
    with pytest.raises(InputError, match="spec"):
        QueryDetector(spec="svhn")
    with pytest.raises(InputError, match="rate"):
        QueryDetector(rate=0)
    with pytest.raises(InputError, match="threshold"):
        FingerprintSpec(window=20, hashes=10, threshold=10)
    with pytest.raises(InputError, match="state"):
        QueryDetector(state="memcached://x")
    with pytest.raises(InputError, match="alerts"):
        QueryDetector(alerts=object())
    det = QueryDetector(spec="cifar")
    with pytest.raises(InputError, match="observe"):
        det.observe("c", [1, 2, 3])
    with pytest.raises(InputError, match="window"):
        det.observe("c", torch.zeros(1, 10))
    with pytest.raises(InputError, match=r"\bn\b"):
        det.admit("c", -1)


def test_client_memories_are_bounded_in_number(mnist_test):
    x = mnist_test[0]
    det = QueryDetector(spec="mnist", client_memories=3, capacity=10)
    for i in range(5):
        det.observe(f"c{i}", x[i : i + 1])
    assert list(det.state.clients) == ["c2", "c3", "c4"]  # the least recently seen forgotten
