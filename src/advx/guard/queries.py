"""Stateful detection of query-based black-box attacks, rate limits and query budgets.

Score- and decision-based attacks (Square, HopSkipJump, Boundary, ...) send long runs of
near-identical inputs. Following the description of Blacklight (Li et al., USENIX Security
2022), every query is reduced to a *fingerprint*: its pixels are quantized to coarse levels,
windows of ``window`` consecutive values slide over the flattened input, each window is hashed
with a secret key, and the ``hashes`` largest distinct hash values are kept. Two inputs that
differ in a few pixels share most windows, hence most of the top hashes; two different images
share almost none. A query is flagged when some remembered fingerprint shares more than
``threshold`` of its hashes.

Two memories are searched, both bounded: an account-oblivious one holding the most recent
``capacity`` queries of all clients (fresh accounts do not help an attacker), and one per
client holding its ``client_capacity`` most recent queries (traffic from other accounts cannot
flush it). Every query is remembered, flagged or not, so an attack that keeps going keeps
being caught.

>>> det = QueryDetector(rate=10, burst=20, budget=10_000, alerts=store)
>>> det.admit("alice", 4)              # None: go ahead; else seconds to wait (Retry-After)
>>> det.observe("alice", x)            # [(flagged, score), ...] per row of x

``observe`` only reports; what happens to a flagged query (an explicit rejection, or a silent
answer from a fallback model) is the service's choice. An explicit rejection tells the
attacker which queries were caught, an oracle that adaptive attacks (OARS, Feng et al. 2023)
use to steer around the detector; a silent answer does not.

The hash is a keyed polynomial hash (a random odd multiplier, a random salt, and the
splitmix64 finalizer), computed for all windows of a batch at once in O(input size). It is not
a cryptographic hash: its security rests on the key staying on the server, as the attacker
only ever sees accept/reject answers. State lives in this process by default; pass
``state="redis://host:port/db"`` to share it between workers (:mod:`.queries_redis`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .._validate import check_float, check_int, fail
from ..errors import InputError

__all__ = [
    "AlertSink",
    "Fingerprinter",
    "FingerprintSpec",
    "LocalState",
    "QueryDetector",
    "PRESETS",
    "preset_for",
]

log = logging.getLogger(__name__)

_U64 = np.uint64
_MOD = 1 << 64


class AlertSink(Protocol):
    """Where detections go (the service's alert store)."""

    def alert(self, client: str, queries: int, score: float) -> None: ...


@dataclass(frozen=True)
class FingerprintSpec:
    """How a query is fingerprinted and when two fingerprints match.

    ``quantization``: the width of a pixel level on the 0-255 scale (50: six levels).
    ``window``/``step``: length and stride of the windows over the flattened input.
    ``hashes``: the fingerprint's size (the top distinct hashes kept). ``threshold``: a query is
    flagged when it shares *more than* this many hashes with a remembered one.
    """

    window: int
    step: int = 1
    quantization: int = 50
    hashes: int = 50
    threshold: int = 25

    def __post_init__(self) -> None:
        who = "FingerprintSpec"
        check_int(self.window, name="window", who=who, low=2)
        check_int(self.step, name="step", who=who)
        check_int(self.quantization, name="quantization", who=who, high=255)
        check_int(self.hashes, name="hashes", who=who)
        check_int(self.threshold, name="threshold", who=who, low=0, high=self.hashes - 1)


# Blacklight's published settings: windows of 50 on MNIST and ImageNet (stride 25 on the
# latter's 150,528 values), 20 on CIFAR-10; quantization step 50; top 50 hashes; T = 25.
PRESETS: dict[str, FingerprintSpec] = {
    "mnist": FingerprintSpec(window=50),
    "cifar": FingerprintSpec(window=20),
    "imagenet": FingerprintSpec(window=50, step=25),
}


def preset_for(shape: Sequence[int]) -> FingerprintSpec:
    """The preset for inputs of ``shape`` (one input, e.g. (1, 28, 28)): single-channel inputs of
    up to 64x64 take MNIST's, inputs of up to 64x64x3 CIFAR's, larger ones ImageNet's."""
    numel = math.prod(int(s) for s in shape)
    channels = int(shape[0]) if len(shape) == 3 else 1
    if channels == 1 and numel <= 64 * 64:
        return PRESETS["mnist"]
    if numel <= 3 * 64 * 64:
        return PRESETS["cifar"]
    return PRESETS["imagenet"]


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array: every input bit moves every output bit,
    so the largest hashes are a uniform pick of the windows."""
    h ^= h >> _U64(30)
    h *= _U64(0xBF58476D1CE4E5B9)
    h ^= h >> _U64(27)
    h *= _U64(0x94D049BB133111EB)
    h ^= h >> _U64(31)
    return h


def _powers(base: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=_U64)
    v = 1
    for i in range(n):
        out[i] = v
        v = v * base % _MOD
    return out


class Fingerprinter:
    """Maps a batch (N, ...) of inputs in [0, 1] to fingerprints (N, hashes) of uint64.

    Each row holds the row's largest distinct window hashes in ascending order; an input with
    fewer distinct windows than ``hashes`` is padded with 0 on the left (0 is never a hash).
    ``key``: the secret the hash is derived from (random when not given); processes that share
    a memory must share the key.
    """

    def __init__(self, spec: FingerprintSpec, *, key: bytes | None = None) -> None:
        self.spec = spec
        self.key = key if key is not None else secrets.token_bytes(32)
        d = hashlib.blake2b(self.key, digest_size=16, person=b"advx-queries").digest()
        self._a = int.from_bytes(d[:8], "little") | 1  # odd: invertible mod 2**64
        self._salt = _U64(int.from_bytes(d[8:], "little"))
        self._tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _table(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        if d not in self._tables:
            a_inv = pow(self._a, -1, _MOD)
            self._tables[d] = (_powers(a_inv, d), _powers(self._a, d))
        return self._tables[d]

    def __call__(self, x: Tensor | np.ndarray) -> np.ndarray:
        s = self.spec
        if isinstance(x, Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        n = x.shape[0]
        flat = np.asarray(x, dtype=np.float32).reshape(n, -1)  # (N, ...) -> (N, D)
        d = flat.shape[1]
        if d < s.window:
            raise InputError(
                f"QueryDetector: inputs of {d} values are shorter than the fingerprint's "
                f"window of {s.window}; pass spec=FingerprintSpec(window=...) with a smaller one"
            )
        levels = np.floor(np.clip(flat, 0.0, 1.0) * (255.0 / s.quantization)).astype(_U64)
        inv, pw = self._table(d)
        # Window hash H(j) = sum_{i<w} v[j+i] * a^-i  (mod 2^64), from one prefix sum:
        # P[k] = sum_{i<k} v[i] * a^-i, so H(j) = a^j * (P[j+w] - P[j]). Wrap-around is intended.
        prefix = np.zeros((n, d + 1), dtype=_U64)
        np.cumsum(levels * inv, axis=1, out=prefix[:, 1:])
        starts = np.arange(0, d - s.window + 1, s.step)
        with np.errstate(over="ignore"):
            h = (prefix[:, starts + s.window] - prefix[:, starts]) * pw[starts]  # (N, windows)
            h = _mix(h ^ self._salt)
        h[h == 0] = 1  # 0 marks an empty slot
        h.sort(axis=1)
        dup = np.zeros_like(h, dtype=bool)
        dup[:, 1:] = h[:, 1:] == h[:, :-1]
        h[dup] = 0
        h.sort(axis=1)
        if h.shape[1] < s.hashes:
            h = np.concatenate([np.zeros((n, s.hashes - h.shape[1]), dtype=_U64), h], axis=1)
        return np.ascontiguousarray(h[:, -s.hashes :])  # (N, hashes)


class Memory:
    """The last ``capacity`` fingerprints with an inverted index from hash to query.

    The index is a few sorted runs of (hash, sequence number) pairs, newest run smallest (a
    small log-structured merge): a lookup is a binary search per hash and run; an insert goes
    into the smallest run, which spills into the next when full. Queries older than the last
    ``capacity`` are ignored at once and dropped when their run is merged, so memory stays
    bounded. Per hash only the ``posting_cap`` most recent queries per run are counted, which
    keeps a lookup fast when a window is common to many inputs (a blank border).
    """

    def __init__(self, capacity: int, *, posting_cap: int = 64, run_sizes=(64, 4096)) -> None:
        self.capacity = capacity
        self.posting_cap = posting_cap
        self.seq = 0  # sequence number of the next query
        sizes = [min(r, capacity) for r in run_sizes if r < capacity] + [capacity]
        self._limits = sizes  # queries per run before it spills (the last run: capacity)
        self._h = [np.empty(0, dtype=_U64) for _ in sizes]
        self._s = [np.empty(0, dtype=np.int64) for _ in sizes]
        self._n = [0 for _ in sizes]  # queries added to each run since it was last emptied

    def __len__(self) -> int:
        return min(self.seq, self.capacity)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._h) + sum(a.nbytes for a in self._s)

    def best(self, fp: np.ndarray) -> int:
        """The most hashes that one remembered query shares with ``fp`` (sorted, no zeros)."""
        oldest = self.seq - self.capacity
        found = []
        for h, s in zip(self._h, self._s, strict=True):
            if not len(h):
                continue
            hi = np.searchsorted(h, fp, side="right")
            lo = np.maximum(np.searchsorted(h, fp, side="left"), hi - self.posting_cap)
            count = hi - lo
            total = int(count.sum())
            if total == 0:
                continue
            start = np.cumsum(count) - count  # where each hash's postings start in the output
            idx = np.repeat(lo - start, count) + np.arange(total)
            found.append(s[idx])
        if not found:
            return 0
        seqs = np.concatenate(found)
        seqs = seqs[seqs >= oldest]
        if not len(seqs):
            return 0
        return int(np.unique(seqs, return_counts=True)[1].max())

    def add(self, fp: np.ndarray) -> None:
        """Remember ``fp`` (sorted, no zeros) as the next query."""
        seq = np.full(len(fp), self.seq, dtype=np.int64)
        self.seq += 1
        self._h[0], self._s[0] = _merge(self._h[0], self._s[0], fp, seq, None)
        self._n[0] += 1
        for i in range(len(self._h) - 1):
            if self._n[i] < self._limits[i]:
                break
            oldest = self.seq - self.capacity
            self._h[i + 1], self._s[i + 1] = _merge(
                self._h[i + 1], self._s[i + 1], self._h[i], self._s[i], oldest
            )
            self._n[i + 1] += self._n[i]
            self._h[i], self._s[i] = np.empty(0, dtype=_U64), np.empty(0, dtype=np.int64)
            self._n[i] = 0
        last = len(self._h) - 1
        if self._n[last] >= 2 * self.capacity:  # compact the last run now and then
            keep = self._s[last] >= self.seq - self.capacity
            self._h[last], self._s[last] = self._h[last][keep], self._s[last][keep]
            self._n[last] = len(self)


def _merge(
    h: np.ndarray, s: np.ndarray, h2: np.ndarray, s2: np.ndarray, oldest: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Insert the sorted newer pairs (h2, s2) into the sorted run (h, s); equal hashes keep
    their age order (newer after), so a hash's most recent postings are at the end of its range.
    Drops pairs older than ``oldest``."""
    if oldest is not None:
        keep = s >= oldest
        if not keep.all():
            h, s = h[keep], s[keep]
    pos = np.searchsorted(h, h2, side="right")
    return np.insert(h, pos, h2), np.insert(s, pos, s2)


class LocalState:
    """All detector state in this process (one lock): the global and per-client memories, the
    token buckets, the budgets, the alert cool-downs."""

    degraded = False

    def __init__(
        self,
        *,
        capacity: int,
        client_capacity: int,
        max_clients: int,
        client_memories: int = 1024,
        posting_cap: int = 64,
    ) -> None:
        self.capacity = capacity
        self.client_capacity = client_capacity
        self.max_clients = max_clients
        self.client_memories = client_memories
        self.posting_cap = posting_cap
        self.memory = Memory(capacity, posting_cap=posting_cap)
        # client -> [memory, queries seen]; least recently seen first
        self.clients: OrderedDict[str, list[Any]] = OrderedDict()
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()  # client -> [tokens, time]
        self.spent: OrderedDict[str, list[int]] = OrderedDict()  # client -> [period, queries]
        self.alerted: dict[str, float] = {}
        self._lock = threading.Lock()

    def _touch(
        self, table: OrderedDict, client: str, make: Callable[[], Any], limit: int | None = None
    ) -> Any:
        entry = table.get(client)
        if entry is None:
            entry = table[client] = make()
            if len(table) > (limit or self.max_clients):
                table.popitem(last=False)
        else:
            table.move_to_end(client)
        return entry

    def match_add(
        self, client: str, fps: np.ndarray, digests: Sequence[bytes]
    ) -> list[tuple[int, int, int]]:
        """Per row: (best global match, best match in the client's memory, the client's query
        count including this one); each row is remembered before the next is looked up.

        A row bit-identical to the client's previous query (``digests``: a hash of each row's
        bytes) is a retry: it teaches an attacker nothing, so it is neither matched nor
        remembered again (it reports (0, 0, count))."""
        out = []
        with self._lock:
            entry = self._touch(
                self.clients,
                client,
                lambda: [Memory(self.client_capacity, posting_cap=self.posting_cap), 0, b""],
                self.client_memories,
            )
            for fp, digest in zip(fps, digests, strict=True):
                entry[1] += 1
                if digest == entry[2]:
                    out.append((0, 0, entry[1]))
                    continue
                entry[2] = digest
                fp = fp[fp != 0]
                g = self.memory.best(fp)
                c = entry[0].best(fp)
                self.memory.add(fp)
                entry[0].add(fp)
                out.append((g, c, entry[1]))
        return out

    def take(
        self,
        client: str,
        n: int,
        now: float,
        *,
        rate: float | None,
        burst: float,
        budget: int | None,
        period: float,
    ) -> float | None:
        with self._lock:
            spent = None
            if budget is not None:
                index = int(now // period)
                spent = self._touch(self.spent, client, lambda: [index, 0])
                if spent[0] != index:
                    spent[0], spent[1] = index, 0
                if spent[1] + n > budget:
                    return (index + 1) * period - now
            if rate is not None:
                bucket = self._touch(self.buckets, client, lambda: [burst, now])
                tokens = min(burst, bucket[0] + max(0.0, now - bucket[1]) * rate)
                bucket[0], bucket[1] = tokens, now
                # A batch larger than the burst waits for a full bucket and leaves it in debt.
                need = min(float(n), burst)
                if tokens < need:
                    return (need - tokens) / rate
                bucket[0] = tokens - n
            if spent is not None:
                spent[1] += n
        return None

    def should_alert(self, client: str, now: float, cooldown: float) -> bool:
        with self._lock:
            last = self.alerted.get(client)
            if last is not None and now - last < cooldown:
                return False
            self.alerted[client] = now
            if len(self.alerted) > self.max_clients:
                self.alerted.pop(next(iter(self.alerted)))
            return True

    def remembered(self) -> int:
        return len(self.memory)

    def nbytes(self) -> int:
        with self._lock:
            return self.memory.nbytes + sum(e[0].nbytes for e in self.clients.values())


class QueryDetector:
    """Catches query attacks from the stream of queries; limits each client's query rate and
    total.

    Args:
        spec: a :class:`FingerprintSpec`, a preset name (``"mnist"``, ``"cifar"``,
            ``"imagenet"``) or None (chosen from the first input's shape by :func:`preset_for`).
        threshold: overrides the spec's (flag when more than this many hashes match).
        capacity: queries the account-oblivious memory holds (all clients).
        client_capacity: queries each client's own memory holds.
        client_memories: clients whose own memories are kept (least recently seen forgotten
            first). In process, the memories take at most about
            ``(capacity + client_memories * client_capacity) * 16 * hashes`` bytes (about 290 MB
            with the defaults and 50 hashes; :meth:`stats` reports what they hold). With Redis,
            a client's keys expire after a day of silence instead.
        max_clients: clients whose buckets, budgets and alert times are kept (least recently
            seen are forgotten first; about 200 bytes each); in-process state only.
        rate, burst: a token bucket per client, ``rate`` queries per second refilled up to
            ``burst`` (default: 2 seconds' worth); None: no rate limit.
        budget, budget_period: at most ``budget`` queries per client per period (seconds,
            fixed windows); None: no budget.
        alerts: an :class:`AlertSink` told of detections: a client's first flagged query, then
            at most one per ``alert_cooldown`` seconds per client.
        key: the hash key (bytes); random when not given. With Redis the key is shared through
            Redis so all workers hash alike.
        state: None (in this process) or a ``redis://`` URL shared by several workers;
            ``prefix`` namespaces its keys (see :mod:`.queries_redis`).
        detect: False keeps the rate limit and budget but fingerprints nothing (``observe``
            answers "not flagged" for every row).
        clock: seconds (wall time: with Redis, processes on several hosts share the bucket).
    """

    def __init__(
        self,
        *,
        spec: FingerprintSpec | str | None = None,
        threshold: int | None = None,
        capacity: int = 100_000,
        client_capacity: int = 256,
        client_memories: int = 1024,
        max_clients: int = 100_000,
        rate: float | None = None,
        burst: float | None = None,
        budget: int | None = None,
        budget_period: float = 86_400.0,
        alerts: AlertSink | None = None,
        alert_cooldown: float = 60.0,
        key: bytes | None = None,
        state: str | None = None,
        prefix: str = "advx:q:",
        posting_cap: int = 64,
        detect: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        who = "QueryDetector"
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise fail(who, "spec", f"one of {', '.join(map(repr, PRESETS))}", spec)
            spec = PRESETS[spec]
        elif spec is not None and not isinstance(spec, FingerprintSpec):
            raise fail(who, "spec", "a FingerprintSpec, a preset name or None", spec)
        check_int(threshold, name="threshold", who=who, low=0, allow_none=True)
        check_int(capacity, name="capacity", who=who)
        check_int(client_capacity, name="client_capacity", who=who)
        check_int(max_clients, name="max_clients", who=who)
        check_int(client_memories, name="client_memories", who=who)
        check_int(posting_cap, name="posting_cap", who=who)
        check_float(rate, name="rate", who=who, low=0, low_open=True, allow_none=True)
        check_float(burst, name="burst", who=who, low=1, allow_none=True)
        check_int(budget, name="budget", who=who, allow_none=True)
        check_float(budget_period, name="budget_period", who=who, low=0, low_open=True)
        check_float(alert_cooldown, name="alert_cooldown", who=who)
        if alerts is not None and not callable(getattr(alerts, "alert", None)):
            raise fail(who, "alerts", "an object with alert(client, queries, score)", alerts)
        if key is not None and not isinstance(key, bytes):
            raise fail(who, "key", "bytes or None", type(key).__name__)
        self.threshold = threshold
        self.rate = None if rate is None else float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, 2.0 * (self.rate or 0.0))
        self.budget = budget
        self.budget_period = float(budget_period)
        self.alerts = alerts
        self.alert_cooldown = float(alert_cooldown)
        self.detect = bool(detect)
        self.clock = clock
        self.flags = 0  # flagged queries seen by this process
        local = LocalState(
            capacity=capacity,
            client_capacity=client_capacity,
            max_clients=max_clients,
            client_memories=client_memories,
            posting_cap=posting_cap,
        )
        self.state: Any
        if state is None:
            self.state = local
        elif isinstance(state, str) and state.startswith(("redis://", "rediss://", "unix://")):
            from .queries_redis import RedisState

            self.state = RedisState(state, fallback=local, prefix=prefix)
            key = self.state.shared_key(key)
        else:
            raise fail(who, "state", "None or a redis:// URL", state)
        self._key = key if key is not None else secrets.token_bytes(32)
        self.fingerprinter: Fingerprinter | None = None
        if spec is not None:
            self.fingerprinter = Fingerprinter(spec, key=self._key)

    @property
    def degraded(self) -> bool:
        """True while a shared state (Redis) is unreachable and this process's memory answers."""
        return bool(self.state.degraded)

    @property
    def spec(self) -> FingerprintSpec | None:
        return None if self.fingerprinter is None else self.fingerprinter.spec

    def admit(self, client: str, n: int) -> float | None:
        """Charge ``n`` queries to ``client``: None when allowed, else the seconds to wait
        before asking again (an HTTP 429's Retry-After)."""
        check_int(n, name="n", who="QueryDetector.admit", low=0)
        if n == 0 or (self.rate is None and self.budget is None):
            return None
        return self.state.take(
            client,
            n,
            self.clock(),
            rate=self.rate,
            burst=self.burst,
            budget=self.budget,
            period=self.budget_period,
        )

    def observe(self, client: str, x: Tensor) -> list[tuple[bool, float]]:
        """Fingerprint, look up and remember each row of ``x`` (N, ...) in order; per row:
        (flagged, score), the score being the largest share of hashes matched in either memory.
        Reports a detection to ``alerts``."""
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise InputError(
                "QueryDetector.observe: x must be a tensor batch (N, ...), "
                f"got {type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}"
            )
        if x.shape[0] == 0:
            return []
        if not self.detect:
            return [(False, 0.0)] * x.shape[0]
        if self.fingerprinter is None:
            self.fingerprinter = Fingerprinter(preset_for(tuple(x.shape[1:])), key=self._key)
        spec = self.fingerprinter.spec
        t = spec.threshold if self.threshold is None else self.threshold
        fps = self.fingerprinter(x)
        rows = x.detach().to("cpu").reshape(x.shape[0], -1).contiguous().numpy()
        digests = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]
        out: list[tuple[bool, float]] = []
        alert: tuple[int, float] | None = None
        for fp, (g, c, seen) in zip(fps, self.state.match_add(client, fps, digests), strict=True):
            size = max(1, int((fp != 0).sum()))
            best = max(g, c)
            flagged = best > t
            score = best / size
            out.append((flagged, score))
            if flagged:
                self.flags += 1
                if alert is None or score > alert[1]:
                    alert = (seen, score)
        if alert is not None and self.alerts is not None:
            if self.state.should_alert(client, self.clock(), self.alert_cooldown):
                try:
                    self.alerts.alert(client, alert[0], alert[1])
                except Exception:  # the alert store must never break serving
                    log.exception("query detector: recording an alert for %r failed", client)
        return out

    def stats(self) -> dict[str, Any]:
        """Remembered queries (global memory), bytes held by this process's memories, bytes per
        remembered query, flags seen by this process, whether the shared state is degraded."""
        n = self.state.remembered()
        b = self.state.nbytes()
        return {
            "remembered": n,
            "bytes": b,
            "bytes_per_query": b / n if n else 0.0,
            "flags": self.flags,
            "degraded": self.degraded,
        }
