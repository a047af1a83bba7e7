"""Monitoring a served guard: Prometheus metrics and a drift test that tolerates repeated looks.

:class:`Monitor` owns one :class:`prometheus_client.CollectorRegistry` (per app, so two apps in
one process — tests, a canary beside production — never share counters): requests by endpoint
and status, latency, batch sizes, decisions by action and by the rule that fired, every
detector's score distribution, the model and policy versions, and the drift verdicts.

Drift. Calibration promised a rate: on clean inputs, at most ``p0`` of them are not accepted
(the policy's false-positive rate), and at most ``p0`` are flagged by a detector. In production
the observed rate wanders, and an operator (or Prometheus, every 15 s) looks at it over and over.
A fixed-sample test checked at every look raises false alarms almost surely in the long run;
:class:`DriftTest` instead keeps an *e-process* whose false-alarm probability over *all* looks,
forever, is bounded by ``alpha`` (see its docstring).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validate import check_float, check_int
from .decision import ACTIONS, Decision

__all__ = ["DriftTest", "Monitor", "reason_rule"]

# Detector scores live on different scales (a squeezing L1 distance, a probability); a broad
# log-ish grid covers all of them well enough to read a shift from the histogram.
SCORE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2, 5, 10)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def reason_rule(reason: str, detectors: Iterable[str] = ()) -> str:
    """The rule behind a reason string, for a bounded metric label.

    Reasons carry numbers (``"feature_squeezing 0.71 > 0.5"``); a label per distinct string
    would grow without bound, so each is mapped to the rule that fired.
    """
    if reason.startswith("invalid input"):
        return "invalid_input"
    if reason.startswith("confidence "):
        return "low_confidence"
    if reason.startswith("no fallback"):
        return "no_fallback"
    if reason.startswith("query attack"):
        return "query_attack"
    head = reason.split(" ", 1)[0]
    return head if head in set(detectors) else "other"


class DriftTest:
    """Is the rate of an event (abstain, detector flag) above its calibrated rate ``p0``?

    Each served input is a Bernoulli draw ``X`` (1: the event happened). Under the null
    hypothesis the rate is at most ``p0`` (what calibration promised). For an alternative rate
    ``q > p0`` the likelihood ratio ``(q/p0)^X ((1-q)/(1-p0))^(1-X)`` has expectation at most 1
    under every null rate ``p <= p0``, so its running product is a non-negative supermartingale;
    an average of such products over a grid of ``q`` (a mixture, so no single alternative has to
    be guessed) is one too. Ville's inequality then bounds the chance that it *ever* reaches
    ``1/alpha`` by ``alpha`` — looking after every request costs nothing (Ramdas et al., "Game-
    theoretic statistics and safe anytime-valid inference", 2023; Wald's SPRT is the one-``q``
    case).

    A product since start-up would remember months of normal traffic and react slowly to a
    change today; so the test runs in epochs of ``epoch`` inputs, each a fresh e-process, with
    an alpha-spending schedule ``alpha_k = alpha * 6 / (pi^2 k^2)`` (k = 1, 2, ...). The
    ``alpha_k`` sum to ``alpha``, so the probability of any false alarm, over every epoch and
    every look, stays at most ``alpha``. Once an epoch's e-value crosses its threshold the alarm
    holds (the null is rejected) until :meth:`reset` — e.g. a new policy.
    """

    def __init__(
        self,
        p0: float,
        *,
        alpha: float = 0.01,
        epoch: int = 5000,
        grid: Sequence[float] | None = None,
    ) -> None:
        check_float(p0, name="p0", low=0, high=1, who="DriftTest")
        check_float(
            alpha, name="alpha", low=0, high=1, low_open=True, high_open=True, who="DriftTest"
        )
        check_int(epoch, name="epoch", low=1, who="DriftTest")
        # p0 = 0 or 1 make the likelihood ratio degenerate; clip to a rate a test can use.
        self.p0 = min(max(float(p0), 1e-6), 1 - 1e-6)
        self.alpha = float(alpha)
        self.epoch_len = int(epoch)
        if grid is None:
            # alternatives from just above p0 to well above it, evenly on a log scale
            hi = min(0.999, max(0.5, 4 * self.p0))
            alts = np.geomspace(self.p0 * 1.25, hi, 16) if self.p0 * 1.25 < hi else [hi]
        else:
            alts = list(grid)
        q = np.asarray([g for g in alts if self.p0 < g < 1], dtype=np.float64)
        if q.size == 0:
            raise ValueError(f"DriftTest: no alternative rate above p0={self.p0:g} in the grid")
        self._log_up = np.log(q / self.p0)  # log LR for X = 1
        self._log_down = np.log((1 - q) / (1 - self.p0))  # log LR for X = 0
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.k = 1  # epoch number
            self.n = 0  # inputs in this epoch
            self.events = 0
            self.total = 0
            self.total_events = 0
            self._log_lr = np.zeros_like(self._log_up)
            self.alarm = False
            self.alarm_evalue = 0.0

    @property
    def alpha_k(self) -> float:
        return self.alpha * 6 / (math.pi**2 * self.k**2)

    def update(self, events: int, n: int) -> None:
        """Record ``events`` occurrences among ``n`` new inputs."""
        if n <= 0:
            return
        with self._lock:
            self.total += n
            self.total_events += events
            # the product of per-input ratios depends only on the counts, so a batch is one step;
            # an epoch boundary inside a batch is moved to the batch's end (still an e-process:
            # the stopping time is decided by counts seen before it).
            self._log_lr += events * self._log_up + (n - events) * self._log_down
            self.n += n
            self.events += events
            e = self.evalue_locked()
            if e >= 1 / self.alpha_k and not self.alarm:
                self.alarm = True
                self.alarm_evalue = e
            if self.n >= self.epoch_len and not self.alarm:
                self.k += 1
                self.n = 0
                self.events = 0
                self._log_lr[:] = 0

    def evalue_locked(self) -> float:
        # capped at 1e300 so it stays a finite JSON number; the alarm fires long before
        m = float(self._log_lr.max())
        if m > 690:
            return 1e300
        return float(math.exp(m) * np.mean(np.exp(self._log_lr - m)))

    @property
    def evalue(self) -> float:
        """The current epoch's e-value (mixture likelihood ratio); 1 means no evidence."""
        with self._lock:
            return self.evalue_locked()

    @property
    def threshold(self) -> float:
        return 1 / self.alpha_k

    def status(self) -> dict[str, Any]:
        with self._lock:
            rate = self.events / self.n if self.n else None
            return {
                "expected_rate": self.p0,
                "observed_rate": rate,
                "observed_rate_total": self.total_events / self.total if self.total else None,
                "inputs": self.total,
                "epoch": self.k,
                "epoch_inputs": self.n,
                "evalue": self.evalue_locked(),
                "threshold": 1 / self.alpha_k,
                "alpha": self.alpha,
                "drift": self.alarm,
            }


@dataclass(frozen=True)
class _Meta:
    name: str
    model_version: str
    policy_hash: str


def _rate(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def expected_rates(policy: Any) -> dict[str, float]:
    """The rates a calibrated policy lets clean inputs reach, by event: ``{"abstain": p,
    "flag": p}`` (``abstain``: not accepted, for any reason; ``flag``: a detector fired).

    Read from ``policy.guarantees``. ``fpr`` bounds the share of clean inputs flagged by any
    rule (the detectors, and the confidence floor when no risk target was set); its stated
    target holds on average over calibration draws, so the null rate is the larger of the
    target and the upper end of the interval measured at calibration — drift means "above what
    calibration could have produced", not "above a point estimate". With a selective-risk
    target the floor is set for risk, not rate: the abstain rate's null is then the measured
    non-coverage plus a Hoeffding margin (99%). An uncalibrated policy promises nothing (``{}``).
    """
    g = getattr(policy, "guarantees", None) or {}
    f = g.get("fpr", g.get("false_positive_rate"))
    if isinstance(f, Mapping):
        target = _rate(f.get("target", f.get("value")))
        interval = f.get("interval")
        upper = _rate(interval[1]) if isinstance(interval, list | tuple) and interval else None
        p_flag = max(v for v in (target, upper) if v is not None) if (target or upper) else None
    else:
        p_flag = _rate(f)
    out: dict[str, float] = {}
    if p_flag is None or not 0 < p_flag < 1:
        return out
    if getattr(policy, "thresholds", None):
        out["flag"] = p_flag
    risk = g.get("selective_risk")
    if isinstance(risk, Mapping) and _rate(risk.get("coverage")) is not None and risk.get("n"):
        n = int(risk["n"])
        p_abst = 1 - float(risk["coverage"]) + math.sqrt(math.log(100) / (2 * n))
        if 0 < p_abst < 1:
            out["abstain"] = p_abst
    else:
        out["abstain"] = p_flag
    return out


class Monitor:
    """Prometheus metrics and drift tests for one served guard (its own registry)."""

    def __init__(
        self,
        *,
        name: str,
        model_version: str,
        policy_hash: str,
        detectors: Sequence[str] = (),
        thresholds: Mapping[str, float] | None = None,
        expected: Mapping[str, float] | None = None,
        alpha: float = 0.01,
        epoch: int = 5000,
        window: int = 1000,
    ) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.detectors = tuple(detectors)
        self.thresholds = dict(thresholds or {})
        self.requests = Counter(
            "advx_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "advx_request_seconds",
            "Request latency by endpoint (seconds)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("advx_requests_in_flight", "Requests being served", registry=r)
        self.batch_size = Histogram(
            "advx_batch_size",
            "Inputs per model pass (dynamic batching)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "advx_guard_decisions", "Guard decisions by action", ["action"], registry=r
        )
        self.reasons = Counter(
            "advx_guard_decision_reasons",
            "Rules that fired, by action "
            "(one count per rule per decision; 'none' for a clean accept)",
            ["action", "reason"],
            registry=r,
        )
        self.scores = Histogram(
            "advx_guard_detector_score",
            "Detector scores (and the model's confidence) of valid inputs",
            ["detector"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.query_flags = Counter(
            "advx_guard_query_flags", "Inputs flagged as part of a query attack", registry=r
        )
        self.rate_limited = Counter(
            "advx_guard_rate_limited", "Requests refused by the query budget (429)", registry=r
        )
        self.info = Info(
            "advx_model", "The served model and the policy it is guarded by", registry=r
        )
        self.policy_loaded = Gauge(
            "advx_policy_loaded_timestamp_seconds",
            "When the current policy was adopted",
            registry=r,
        )
        self.drift_evalue = Gauge(
            "advx_guard_drift_evalue",
            "Drift e-value of the current epoch (alarm at 1/alpha_k; valid under repeated looks)",
            ["rate"],
            registry=r,
        )
        self.drift_threshold = Gauge(
            "advx_guard_drift_threshold",
            "E-value at which the drift alarm fires",
            ["rate"],
            registry=r,
        )
        self.drift_alarm = Gauge(
            "advx_guard_drift",
            "1 when the rate is significantly above calibration",
            ["rate"],
            registry=r,
        )
        self.drift_expected = Gauge(
            "advx_guard_expected_rate", "The calibrated rate", ["rate"], registry=r
        )
        self.recent_rate = Gauge(
            "advx_guard_recent_rate",
            "Share of the last inputs with the event "
            "(abstain: not accepted; flag: a detector fired)",
            ["rate"],
            registry=r,
        )
        self._recent: dict[str, deque[int]] = {
            "abstain": deque(maxlen=window),
            "flag": deque(maxlen=window),
        }
        self._lock = threading.Lock()
        self.alpha = alpha
        self.epoch = epoch
        self.drift: dict[str, DriftTest] = {}
        self.set_versions(name=name, model_version=model_version, policy_hash=policy_hash)
        self.set_expected(expected or {})

    def set_versions(self, *, name: str, model_version: str, policy_hash: str) -> None:
        import time

        self.meta = _Meta(name, model_version, policy_hash)
        self.info.info({"name": name, "model_version": model_version, "policy_hash": policy_hash})
        self.policy_loaded.set(time.time())

    def set_expected(self, expected: Mapping[str, float]) -> None:
        """(Re)start the drift tests against calibrated rates (``{"abstain": p, "flag": p}``)."""
        self.drift = {
            k: DriftTest(p, alpha=self.alpha, epoch=self.epoch)
            for k, p in expected.items()
            if k in self._recent
        }
        for k, t in self.drift.items():
            self.drift_expected.labels(k).set(t.p0)
            self.drift_threshold.labels(k).set(t.threshold)
            self.drift_evalue.labels(k).set(1.0)
            self.drift_alarm.labels(k).set(0)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def flagged(self, d: Decision) -> bool:
        return any(d.scores.get(k, -math.inf) > t for k, t in self.thresholds.items())

    def observe_decisions(self, decisions: Iterable[Decision]) -> None:
        """Count decisions and feed the drift tests (valid inputs only: an invalid row says
        nothing about the model's calibration)."""
        abst = flags = n = 0
        with self._lock:
            for d in decisions:
                self.decisions.labels(d.action).inc()
                if not d.reasons:
                    self.reasons.labels(d.action, "none").inc()
                for why in d.reasons:
                    self.reasons.labels(d.action, reason_rule(why, self.detectors)).inc()
                if d.predicted is None:  # refused before the model saw it
                    continue
                for k, v in d.scores.items():
                    self.scores.labels(k).observe(v)
                a = int(d.action != "accept")
                f = int(self.flagged(d))
                self._recent["abstain"].append(a)
                self._recent["flag"].append(f)
                abst += a
                flags += f
                n += 1
            for k, q in self._recent.items():
                if q:
                    self.recent_rate.labels(k).set(sum(q) / len(q))
        for k, events in (("abstain", abst), ("flag", flags)):
            t = self.drift.get(k)
            if t is not None and n:
                t.update(events, n)
                self.drift_evalue.labels(k).set(t.evalue)
                self.drift_threshold.labels(k).set(t.threshold)
                self.drift_alarm.labels(k).set(int(t.alarm))

    def status(self) -> dict[str, Any]:
        """Versions and drift verdicts, as JSON for ``/health`` and ``advx guard status``."""
        with self._lock:
            recent = {k: (sum(q) / len(q) if q else None) for k, q in self._recent.items()}
        return {
            "model": self.meta.name,
            "model_version": self.meta.model_version,
            "policy_hash": self.meta.policy_hash,
            "recent_rates": recent,
            "drift": {k: t.status() for k, t in self.drift.items()},
            "actions": list(ACTIONS),
        }

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
