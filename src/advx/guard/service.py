"""The guard behind HTTP: advx's black-box protocol and the Open Inference Protocol v2.

>>> app = create_app(guard, name="mnist")     # a Starlette ASGI app
>>> uvicorn.run(app, host="127.0.0.1", port=8000)

The service is a thin shell over :class:`~advx.guard.Guard`: it reads a bounded body, turns
every malformed request into a 4xx whose JSON names the field and what was expected, merges
concurrent requests into one model pass (dynamic batching: a short window, a bounded batch, the
model run in a worker thread so the event loop keeps accepting), and reports to the monitor.

Endpoints: ``POST /predict`` (``{"inputs": [...]}`` in, ``{"scores", "labels", "decisions"}``
out: :func:`advx.BlackBox.from_http` attacks it unchanged), ``POST /v2/models/{name}/infer``
and the rest of the v2 protocol (JSON and binary tensors, so ``tritonclient.http`` works
unchanged; the guard's decisions ride in the response ``parameters``), ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /openapi.json``.

What a row's ``scores``/``labels`` say: the model's own answer for every input it saw, so a
score-based attack (and the canary) measures the model; the guard's verdict on that answer is
the row's decision (``decisions[i].label`` is the class a caller may act on, ``None`` when the
guard abstained). Rows refused before the model (invalid, or a query attack in ``reject``
mode) have no scores (``null``; zeros and label -1 in v2).

Plug points (Protocols below; other guard modules implement them): ``queries`` (per-client
budgets and query-attack detection), ``alerts`` and ``review`` (a durable queue for inputs a
human should look at: called before the response is sent).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import struct
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._version import __version__
from ..errors import InputError
from .decision import Decision
from .guard import Guard
from .monitor import Monitor, expected_rates
from .validate import check_rows

__all__ = [
    "AlertSink",
    "JsonLogFormatter",
    "QueryMonitor",
    "ReviewQueue",
    "create_app",
]

log = logging.getLogger("advx.guard.service")

# ---------------------------------------------------------------------------------------------
# Plug points


@runtime_checkable
class QueryMonitor(Protocol):
    """Per-client query budgets and query-attack detection."""

    def admit(self, client: str, n: int) -> float | None:
        """May ``client`` send ``n`` more inputs now? ``None``: yes; else seconds to wait."""
        ...

    def observe(self, client: str, x: Tensor) -> list[tuple[bool, float]]:
        """Remember ``x`` (valid rows, ``(N, *shape)``); per row: (part of an attack?, score)."""
        ...


@runtime_checkable
class AlertSink(Protocol):
    def alert(self, client: str, queries: int, score: float) -> None:
        """``client`` looks like a query attack after ``queries`` inputs (detector ``score``)."""
        ...


@runtime_checkable
class ReviewQueue(Protocol):
    def put(self, items: list[dict]) -> None:
        """Store items durably (returns only once they are safe); raises when it cannot."""
        ...


# ---------------------------------------------------------------------------------------------
# Errors and logs


class RequestError(Exception):
    """A request the service refuses: its status and the field that was wrong."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        expected: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.expected = expected
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self, request_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            doc["field"] = self.field
        if self.expected is not None:
            doc["expected"] = self.expected
        doc.update(self.extra)
        doc["request_id"] = request_id
        return doc


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra={"fields": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            doc.update(fields)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


# ---------------------------------------------------------------------------------------------
# Bodies

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class _NotFinite(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotFinite(f"{name} is not a JSON number")


def parse_json(raw: bytes, *, what: str = "body") -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity literals. A number too large for a float (1e309)
    parses as an infinity, which row validation refuses with its position; checking every
    number here instead (a Python callback per number) made parsing ten times slower."""
    if not raw.strip():
        raise RequestError(400, f"the {what} is empty", field=what, expected="a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            400,
            f"the {what} is not UTF-8 (invalid byte at position {e.start})",
            field=what,
            expected="JSON encoded as UTF-8",
        ) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except _NotFinite as e:
        raise RequestError(400, str(e), field=what, expected="finite numbers") from None
    except json.JSONDecodeError as e:
        raise RequestError(
            400,
            f"the {what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            field=what,
            expected="a JSON object",
        ) from None
    except RecursionError:
        raise RequestError(
            400, f"the {what} is nested too deeply", field=what, expected="a JSON object"
        ) from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise RequestError(
            400,
            f"the {what} holds an unreadable number ({str(e)[:60]})",
            field=what,
            expected="numbers with at most 4300 digits",
        ) from None


async def read_body(request: Any, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from
    Content-Length before reading anything, else while streaming (chunked uploads)."""
    enc = request.headers.get("content-encoding", "identity").strip().lower()
    if enc not in ("", "identity", "gzip", "deflate"):
        raise RequestError(
            415,
            f"Content-Encoding {enc!r} is not supported",
            field="Content-Encoding",
            expected="identity, gzip or deflate",
        )
    inflate = None
    if enc in ("gzip", "deflate"):
        # tritonclient's request_compression_algorithm; the limit applies to the inflated
        # bytes too, checked as they come out (a small bomb cannot expand past it)
        inflate = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            size = -1
        if size < 0:
            raise RequestError(
                400,
                "Content-Length is not a byte count",
                field="Content-Length",
                expected="a non-negative integer",
            )
        if size > limit:
            raise _too_large(size, limit)
    buf = bytearray()
    async for chunk in request.stream():
        if inflate is not None:
            try:
                chunk = inflate.decompress(chunk, limit + 1 - len(buf))
            except zlib.error as e:
                raise RequestError(
                    400,
                    f"the body is not valid {enc} ({e})",
                    field="Content-Encoding",
                    expected=f"a {enc}-compressed body",
                ) from None
            if inflate.unconsumed_tail:
                raise _too_large(limit + 1, limit, partial=True)
        buf += chunk
        if len(buf) > limit:
            raise _too_large(len(buf), limit, partial=True)
    if inflate is not None and not inflate.eof:
        raise RequestError(
            400,
            f"the {enc} body is truncated",
            field="Content-Encoding",
            expected=f"a complete {enc} stream",
        )
    return bytes(buf)


def _too_large(size: int, limit: int, *, partial: bool = False) -> RequestError:
    got = f"more than {limit}" if partial else str(size)
    return RequestError(
        413,
        f"the body is {got} bytes; the limit is {limit}",
        field="body",
        expected=f"at most {limit} bytes (send fewer inputs per request)",
    )


# ---------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class _Job:
    x: Tensor
    silent: Tensor  # bool per row: answer from the fallback / abstain, without saying why
    fut: asyncio.Future
    t: float


@dataclass
class _Out:
    decisions: list[Decision]
    probs: Tensor  # (N, C) the model's probabilities
    silent_probs: Tensor | None  # (N, C) what silent rows are answered with
    silent_labels: list[int | None]
    guard: Any = None  # the guard that answered this batch (a reload swaps it between batches)


class Batcher:
    """Merges concurrent requests into one model pass.

    A request's rows wait at most ``window_s`` after the first queued request for others to
    join, up to ``max_batch`` rows (a request larger than that runs alone). One batch runs at a
    time in a dedicated thread; requests arriving meanwhile queue, so under load batches form
    even with a zero window. ``max_batch=1`` is one request per pass (no batching).
    """

    def __init__(
        self,
        run: Callable[[Tensor, Tensor], _Out],
        *,
        window_s: float,
        max_batch: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run = run
        self.window_s = max(0.0, float(window_s))
        self.max_batch = max(1, int(max_batch))
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advx-model")

    async def submit(self, x: Tensor, silent: Tensor) -> _Out:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            # started on first use, in the server's loop (works with or without lifespan events)
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        fut = loop.create_future()
        self._jobs.append(_Job(x, silent, fut, loop.time()))
        assert self._wake is not None
        self._wake.set()
        return await fut

    def _queued_rows(self) -> int:
        return sum(j.x.shape[0] for j in self._jobs)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            first = self._jobs[0]
            while self._queued_rows() < self.max_batch:
                remaining = first.t + self.window_s - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._jobs.popleft()]
            rows = batch[0].x.shape[0]
            shape = batch[0].x.shape[1:]
            while self._jobs:
                nxt = self._jobs[0]
                if nxt.x.shape[1:] != shape or rows + nxt.x.shape[0] > self.max_batch:
                    break
                batch.append(self._jobs.popleft())
                rows += nxt.x.shape[0]
            live = [j for j in batch if not j.fut.done()]  # a timed-out request was cancelled
            if not live:
                continue
            x = torch.cat([j.x for j in live]) if len(live) > 1 else live[0].x
            silent = torch.cat([j.silent for j in live]) if len(live) > 1 else live[0].silent
            try:
                out = await loop.run_in_executor(self._pool, self.run, x, silent)
            except Exception as e:  # the model failed: every request in the batch hears why
                for j in live:
                    if not j.fut.done():
                        j.fut.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(x.shape[0])
            start = 0
            for j in live:
                n = j.x.shape[0]
                part = _Out(
                    out.decisions[start : start + n],
                    out.probs[start : start + n],
                    None if out.silent_probs is None else out.silent_probs[start : start + n],
                    out.silent_labels[start : start + n],
                )
                start += n
                if not j.fut.done():
                    j.fut.set_result(part)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The v2 tensor codec

_V2_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
V2_OUTPUTS = ("scores", "label", "predicted", "confidence", "action")


def _bytes_tensor(values: Sequence[str]) -> bytes:
    """Triton's BYTES encoding: each element as a 4-byte little-endian length, then its bytes."""
    out = bytearray()
    for v in values:
        b = v.encode()
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# The app


@dataclass
class _Served:
    """One request's answer, assembled in input order."""

    decisions: list[Decision]  # what the caller is told
    internal: list[Decision]  # what the monitor and the review queue see (real reasons)
    scores: list[list[float] | None]
    rows: dict[int, Tensor] = field(default_factory=dict)  # valid rows, for review items
    version: str = ""  # the model version and policy that answered (constant across a reload)
    policy_hash: str = ""


class GuardService:
    """The state behind one app: the guard, batcher, monitor and plug points."""

    def __init__(
        self,
        guard: Guard,
        *,
        name: str,
        input_shape: Sequence[int] | None,
        max_body_bytes: int,
        batch_window_ms: float,
        max_batch: int,
        timeout_s: float,
        queries: QueryMonitor | None,
        review: ReviewQueue | None,
        alerts: AlertSink | None,
        detect_queries: Literal["reject", "silent"],
        api_keys: Mapping[str, str] | None,
        expected: Mapping[str, float] | None,
        drift_alpha: float,
        reloader: Any = None,
        admin_token: str | None = None,
    ) -> None:
        if not isinstance(guard, Guard):
            raise InputError(f"create_app: guard must be an advx.guard.Guard, got {type(guard)}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InputError(f"create_app: name must be 1-64 of [A-Za-z0-9_.-], got {name!r}")
        if detect_queries not in ("reject", "silent"):
            raise InputError(
                f"create_app: detect_queries must be 'reject' or 'silent', got {detect_queries!r}"
            )
        for what, v in (("max_body_bytes", max_body_bytes), ("max_batch", max_batch)):
            if not isinstance(v, int) or v < 1:
                raise InputError(f"create_app: {what} must be a positive integer, got {v!r}")
        if not timeout_s > 0 or batch_window_ms < 0:
            raise InputError(
                "create_app: timeout_s must be > 0 and batch_window_ms >= 0, "
                f"got {timeout_s!r}, {batch_window_ms!r}"
            )
        shape = input_shape if input_shape is not None else guard.input_shape
        if shape is None:
            raise InputError(
                "create_app: the input shape is unknown; pass input_shape=(1, 28, 28) "
                "or build the Guard with input_shape="
            )
        self.guard = guard
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.max_body = max_body_bytes
        self.max_rows = guard.max_rows
        self.timeout_s = float(timeout_s)
        self.queries = queries
        self.review = review
        self.alerts = alerts
        self.detect_queries = detect_queries
        self.api_keys = dict(api_keys) if api_keys else None
        self.device = getattr(guard.model, "device", None) or "cpu"
        self.num_classes = self._warm_up()
        self.monitor = Monitor(
            name=name,
            model_version=guard.version,
            policy_hash=guard.policy.hash,
            detectors=list(guard.detectors),
            thresholds=guard.policy.thresholds,
            expected=expected if expected is not None else expected_rates(guard.policy),
            alpha=drift_alpha,
        )
        self.batcher = Batcher(
            self._infer,
            window_s=batch_window_ms / 1000,
            max_batch=max_batch,
            on_batch=self.monitor.observe_batch,
        )
        self._client_queries: OrderedDict[str, int] = OrderedDict()
        self.started = time.time()
        self._expected_given = expected is not None
        self.reloader = reloader  # loads a newly promoted version (advx.guard.reload)
        self.admin_token = admin_token or None
        if reloader is not None:
            reloader.attach(self.monitor.registry)

    # -- the model side (worker thread) ---------------------------------------------------------

    def _warm_up(self, guard: Guard | None = None) -> int:
        guard = guard or self.guard
        lo, hi = guard.bounds
        x = torch.full((1, *self.shape), (lo + hi) / 2)
        try:
            with torch.no_grad():
                out = guard.model.scores(x.to(getattr(guard.model, "device", None) or "cpu"))
        except Exception as e:
            raise InputError(
                f"the model cannot run on one input of shape {list(self.shape)}: "
                f"{type(e).__name__}: {e}; pass the right input shape"
            ) from None
        if out.dim() != 2:
            raise InputError(f"the model returned shape {list(out.shape)}; expected (N, classes)")
        return int(out.shape[1])

    def _infer(self, x: Tensor, silent: Tensor) -> _Out:
        guard = self.guard
        # the answer's scores are the probabilities the guard decided from: no second pass
        decided, guard_probs = guard.decide(x)
        decisions = list(decided)
        with torch.no_grad():
            xd = x.to(self.device)
            if guard_probs is not None:
                probs = guard_probs.float().cpu()
            else:  # no row passed the guard's own validation (the service checked them first)
                probs = F.softmax(guard.model.scores(xd).float(), dim=1).cpu()
            silent_probs = None
            silent_labels: list[int | None] = [None] * x.shape[0]
            if bool(silent.any()):
                silent_probs = torch.full_like(probs, 1.0 / probs.shape[1])
                if guard.fallback is not None:
                    idx = silent.nonzero().view(-1)
                    fb = F.softmax(guard.fallback.scores(xd[idx]).float(), dim=1).cpu()
                    silent_probs[idx] = fb
                    for k, i in enumerate(idx.tolist()):
                        silent_labels[i] = int(fb[k].argmax())
        return _Out(decisions, probs, silent_probs, silent_labels, guard)

    def swap_guard(self, guard: Guard) -> None:
        """Serve ``guard`` from the next batch on (a batch in flight finishes with the old one).
        Refused (:class:`InputError`, the old guard kept) when it cannot answer the same
        requests: other bounds, another input shape or number of classes."""
        if not isinstance(guard, Guard):
            raise InputError(f"swap_guard: expected an advx.guard.Guard, got {type(guard)}")
        if tuple(guard.bounds) != tuple(self.guard.bounds):
            raise InputError(
                f"the new model's bounds {list(guard.bounds)} differ from the served "
                f"{list(self.guard.bounds)}; restart the service to change them"
            )
        if guard.input_shape is not None and tuple(guard.input_shape) != self.shape:
            raise InputError(
                f"the new model takes inputs of shape {list(guard.input_shape)}, the service "
                f"{list(self.shape)}; restart the service to change it"
            )
        classes = self._warm_up(guard)
        if classes != self.num_classes:
            raise InputError(
                f"the new model has {classes} classes, the served one {self.num_classes}; "
                "restart the service to change them"
            )
        # one assignment: the model thread reads self.guard once per batch
        self.guard = guard
        mon = self.monitor
        mon.detectors = tuple(guard.detectors)
        mon.thresholds = dict(guard.policy.thresholds)
        mon.set_versions(name=self.name, model_version=guard.version, policy_hash=guard.policy.hash)
        if not self._expected_given:  # the drift tests restart against the new calibration
            mon.set_expected(expected_rates(guard.policy))

    # -- request plumbing ------------------------------------------------------------------------

    def client_of(self, request: Any) -> str:
        client = self._client_of(request)
        request.state.client = client  # for the request's log line
        return client

    def _client_of(self, request: Any) -> str:
        auth = request.headers.get("authorization")
        if self.api_keys is not None:
            key = ""
            if auth and auth.lower().startswith("bearer "):
                key = auth[7:].strip()
            client = self.api_keys.get(key)
            if client is None:
                raise RequestError(
                    401,
                    "missing or unknown API key",
                    field="Authorization",
                    expected="Authorization: Bearer <a configured API key>",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return client
        cid = request.headers.get("x-client-id")
        if cid:
            if not _REQUEST_ID.fullmatch(cid):
                raise RequestError(
                    400,
                    "X-Client-Id holds characters outside [A-Za-z0-9._:/+=-] or is too long",
                    field="X-Client-Id",
                    expected="1-128 characters of [A-Za-z0-9._:/+=-]",
                )
            return cid
        return request.client.host if request.client else "unknown"

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def admit(self, client: str, n: int) -> None:
        if self.queries is None:
            return
        wait = await self._thread(self.queries.admit, client, n)
        if wait is not None:
            self.monitor.rate_limited.inc()
            secs = max(1, math.ceil(float(wait)))
            raise RequestError(
                429,
                f"query budget exhausted for this client; retry in {float(wait):.3g}s",
                field="client",
                expected="fewer queries per unit of time",
                headers={"Retry-After": str(secs)},
                extra={"retry_after_s": float(wait)},
            )

    def _count(self, client: str, n: int) -> int:
        total = self._client_queries.pop(client, 0) + n
        self._client_queries[client] = total
        while len(self._client_queries) > 100_000:  # bounded memory: forget the oldest clients
            self._client_queries.popitem(last=False)
        return total

    async def serve_rows(
        self, rows: Any, *, client: str, request_id: str, field_name: str
    ) -> _Served:
        """Validate rows, run them through the batcher and the plug points; 422 if none is
        valid."""
        try:
            x, index, bad = check_rows(
                rows, shape=self.shape, bounds=self.guard.bounds, max_rows=self.max_rows
            )
        except ValueError as e:  # not a batch at all
            raise RequestError(400, str(e), field=field_name, expected="a list of inputs") from None
        n = len(index) + len(bad)
        if x is None:
            first = min(bad)
            raise RequestError(
                422,
                f"no valid input: {field_name}[{first}] {bad[first]}",
                field=f"{field_name}[{first}]",
                expected=f"numbers of shape {list(self.shape)} within {list(self.guard.bounds)}",
                extra={"rows": {str(i): why for i, why in sorted(bad.items())[:20]}},
            )
        total = self._count(client, n)
        flags: list[tuple[bool, float]] = [(False, 0.0)] * x.shape[0]
        if self.queries is not None:
            flags = list(await self._thread(self.queries.observe, client, x))
            if len(flags) != x.shape[0]:
                raise RuntimeError(
                    f"queries.observe returned {len(flags)} verdicts for {x.shape[0]} rows"
                )
        flagged = torch.tensor([bool(f) for f, _ in flags], dtype=torch.bool)
        silent = flagged if self.detect_queries == "silent" else torch.zeros_like(flagged)
        if bool(flagged.any()):
            self.monitor.query_flags.inc(int(flagged.sum()))
            if self.alerts is not None:
                score = max(s for f, s in flags if f)
                await self._thread(self.alerts.alert, client, total, float(score))
        out = await self.batcher.submit(x, silent)

        g = out.guard or self.guard
        version, ph = g.version, g.policy.hash
        decisions: list[Decision | None] = [None] * n
        internal: list[Decision | None] = [None] * n
        scores: list[list[float] | None] = [None] * n
        for i, why in bad.items():
            d = Decision("reject", None, None, None, {}, (f"invalid input: {why}",), version, ph)
            decisions[i] = internal[i] = d
        row_of: dict[int, Tensor] = {}
        for k, i in enumerate(index):
            d = out.decisions[k]
            row_of[i] = x[k]
            if flagged[k]:
                qscore = {**d.scores, "query_attack": float(flags[k][1])}
                real = Decision(
                    "reject"
                    if self.detect_queries == "reject"
                    else ("fallback" if out.silent_labels[k] is not None else "abstain"),
                    out.silent_labels[k],
                    d.predicted,
                    d.confidence,
                    qscore,
                    ("query attack suspected",),
                    version,
                    ph,
                )
                internal[i] = real
                if self.detect_queries == "reject":
                    decisions[i] = real
                else:  # an answer that does not tell the attacker it was caught
                    decisions[i] = Decision(
                        real.action, out.silent_labels[k], None, None, {}, (), version, ph
                    )
                    assert out.silent_probs is not None
                    scores[i] = out.silent_probs[k].tolist()
            else:
                decisions[i] = internal[i] = d
                scores[i] = out.probs[k].tolist()
        served = _Served(
            [d for d in decisions if d is not None],
            [d for d in internal if d is not None],
            scores,
            row_of,
            version,
            ph,
        )
        self.monitor.observe_decisions(served.internal)
        await self._to_review(served, client=client, request_id=request_id)
        return served

    async def _to_review(self, served: _Served, *, client: str, request_id: str) -> None:
        """Inputs the model saw and the guard did not accept go to the review queue, durably,
        before the caller hears anything (invalid rows do not: nobody can label them)."""
        if self.review is None:
            return
        stamp = datetime.now(timezone.utc).isoformat()
        items = []
        for i, d in enumerate(served.internal):
            if d.action == "accept" or i not in served.rows:
                continue
            row = served.rows[i]
            items.append(
                {
                    "input": row.tolist(),
                    "shape": list(row.shape),
                    "action": d.action,
                    "label": d.label,
                    "predicted": d.predicted,
                    "confidence": d.confidence,
                    "scores": dict(d.scores),
                    "reasons": list(d.reasons),
                    "model_version": d.model_version,
                    "policy_hash": d.policy_hash,
                    "client": client,
                    "request_id": request_id,
                    "time": stamp,
                }
            )
        if not items:
            return
        try:
            await self._thread(self.review.put, items)
        except Exception as e:
            log.error(
                "review queue failed",
                extra={"fields": {"request_id": request_id, "error": f"{type(e).__name__}: {e}"}},
            )
            raise RequestError(
                503,
                "the review queue is unavailable; nothing was answered (retry later)",
                headers={"Retry-After": "5"},
            ) from None

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "live": True,
            "ready": True,
            "advx_version": __version__,
            "uptime_s": round(time.time() - self.started, 3),
            "input_shape": list(self.shape),
            "num_classes": self.num_classes,
            "bounds": list(self.guard.bounds),
            "detectors": sorted(self.guard.detectors),
            **self.monitor.status(),
        }


def create_app(
    guard: Guard,
    *,
    name: str = "model",
    input_shape: Sequence[int] | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    batch_window_ms: float = 2,
    max_batch: int = 64,
    timeout_s: float = 30.0,
    queries: QueryMonitor | None = None,
    review: ReviewQueue | None = None,
    alerts: AlertSink | None = None,
    detect_queries: Literal["reject", "silent"] = "reject",
    api_keys: Mapping[str, str] | None = None,
    expected_rates: Mapping[str, float] | None = None,
    drift_alpha: float = 0.01,
    reloader: Any = None,
    admin_token: str | None = None,
) -> Any:
    """A Starlette app serving ``guard`` (see the module docstring for the endpoints).

    ``input_shape`` (default: the guard's) is the shape of one input; the model is run once on
    it at start-up, so a wrong shape fails here, not on the first request. ``max_batch=1``
    turns dynamic batching off. ``api_keys`` maps a bearer key to a client name (then every
    request needs one). ``expected_rates`` overrides the calibrated rates the drift tests
    compare with (default: read from the policy's guarantees). ``reloader``
    (:class:`~advx.guard.reload.ModelDirReloader`) serves a model directory's newly promoted
    version on ``POST /admin/reload``, authenticated by ``Authorization: Bearer
    <admin_token>``.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    svc = GuardService(
        guard,
        name=name,
        input_shape=input_shape,
        max_body_bytes=max_body_bytes,
        batch_window_ms=batch_window_ms,
        max_batch=max_batch,
        timeout_s=timeout_s,
        queries=queries,
        review=review,
        alerts=alerts,
        detect_queries=detect_queries,
        api_keys=api_keys,
        expected=expected_rates,
        drift_alpha=drift_alpha,
        reloader=reloader,
        admin_token=admin_token,
    )
    mon = svc.monitor

    def endpoint(
        label: str, handler: Callable[[Request, str], Awaitable[Response]], *, timed: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """Request id in and out, the timeout, 4xx bodies for refused requests, metrics, a log
        line per request."""

        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            rid = request.headers.get("x-request-id", "")
            if not _REQUEST_ID.fullmatch(rid):
                rid = uuid.uuid4().hex
            mon.inflight.inc()
            try:
                if timed:
                    response = await asyncio.wait_for(handler(request, rid), svc.timeout_s)
                else:
                    response = await handler(request, rid)
            except RequestError as e:
                response = json_response(e.body(rid), status_code=e.status, headers=e.headers)
            except TimeoutError:
                response = json_response(
                    {"error": f"no answer within {svc.timeout_s:g}s", "request_id": rid},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
            except Exception as e:  # a bug or a failing model: say so, never a bare traceback
                log.exception(
                    "request failed", extra={"fields": {"request_id": rid, "path": label}}
                )
                response = json_response(
                    {"error": f"internal error: {type(e).__name__}", "request_id": rid},
                    status_code=500,
                )
            finally:
                mon.inflight.dec()
            response.headers["X-Request-Id"] = rid
            dt = time.perf_counter() - t0
            mon.observe_request(label, response.status_code, dt)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra={
                        "fields": {
                            "request_id": rid,
                            "method": request.method,
                            "path": request.url.path,
                            "endpoint": label,
                            "status": response.status_code,
                            "ms": round(dt * 1000, 3),
                            "peer": request.client.host if request.client else None,
                            "client": getattr(request.state, "client", None),
                        }
                    },
                )
            return response

        return run

    # -- advx protocol --------------------------------------------------------------------------

    async def predict(request: Request, rid: str) -> Response:
        client = svc.client_of(request)
        ctype = request.headers.get("content-type")
        if ctype is not None and not _is_json(ctype):
            raise RequestError(
                415,
                f"Content-Type {ctype[:60]!r} is not JSON",
                field="Content-Type",
                expected="application/json",
            )
        doc = parse_json(await read_body(request, svc.max_body))
        if not isinstance(doc, dict):
            raise RequestError(
                400,
                f"the body is a JSON {type(doc).__name__}, not an object",
                field="body",
                expected='an object such as {"inputs": [[...]]}',
            )
        if "inputs" not in doc:
            raise RequestError(
                400,
                "the body has no 'inputs'",
                field="inputs",
                expected=f"a list of inputs of shape {list(svc.shape)}",
            )
        rows = doc["inputs"]
        _check_batch(rows, "inputs", svc)
        await svc.admit(client, len(rows))
        served = await svc.serve_rows(rows, client=client, request_id=rid, field_name="inputs")
        labels = [None if s is None else int(np.argmax(s)) for s in served.scores]
        return json_response(
            {
                "scores": served.scores,
                "labels": labels,
                "decisions": [d.to_json() for d in served.decisions],
                "model_version": served.version,
                "policy_hash": served.policy_hash,
                "request_id": rid,
            }
        )

    # -- Open Inference Protocol v2 -------------------------------------------------------------

    def check_model(request: Request) -> None:
        model = request.path_params.get("model")
        if model != svc.name:
            raise RequestError(
                404,
                f"no model named {str(model)[:80]!r}",
                field="model",
                expected=f"the served model, {svc.name!r}",
            )
        version = request.path_params.get("version")
        if version is not None and version not in ("1", svc.guard.version):
            raise RequestError(
                404,
                f"no version {str(version)[:40]!r} of model {svc.name!r}",
                field="version",
                expected=f"'1' or {svc.guard.version!r}",
            )

    async def v2_server(request: Request, rid: str) -> Response:
        return json_response(
            {"name": "advx", "version": __version__, "extensions": ["binary_tensor_data"]}
        )

    async def v2_live(request: Request, rid: str) -> Response:
        return json_response({"live": True})

    async def v2_ready(request: Request, rid: str) -> Response:
        return json_response({"ready": True})

    async def v2_model_ready(request: Request, rid: str) -> Response:
        check_model(request)
        return json_response({"name": svc.name, "ready": True})

    async def v2_metadata(request: Request, rid: str) -> Response:
        check_model(request)
        return json_response(_v2_metadata(svc))

    async def v2_infer(request: Request, rid: str) -> Response:
        check_model(request)
        client = svc.client_of(request)
        raw = await read_body(request, svc.max_body)
        head, binary = _split_binary(raw, request.headers.get("inference-header-content-length"))
        doc = parse_json(head, what="inference header" if binary is not None else "body")
        x, outputs, binary_out, req_id = _v2_parse(doc, binary or b"", svc)
        await svc.admit(client, x.shape[0])
        served = await svc.serve_rows(x, client=client, request_id=rid, field_name="inputs[0]")
        return _v2_response(served, outputs, binary_out, req_id, svc)

    # -- service endpoints ----------------------------------------------------------------------

    async def health(request: Request, rid: str) -> Response:
        return json_response(svc.health())

    async def admin_reload(request: Request, rid: str) -> Response:
        _check_admin(request, svc)
        if svc.reloader is None:
            raise RequestError(
                409,
                "this service serves a fixed model, not a model directory",
                field="path",
                expected="advx serve --model-dir DIR for reloads",
            )
        # the loading runs beside the model thread; the swap happens between two batches
        return json_response(await svc._thread(svc.reloader.reload, svc))

    async def metrics(request: Request, rid: str) -> Response:
        body, ctype = mon.exposition()
        return Response(body, media_type=ctype)

    openapi = {svc.guard.version: openapi_document(svc)}  # built once per served version

    async def openapi_json(request: Request, rid: str) -> Response:
        version = svc.guard.version
        if version not in openapi:  # a reload changed the version the document names
            openapi.clear()
            openapi[version] = openapi_document(svc)
        return json_response(openapi[version])

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        rid = uuid.uuid4().hex
        msg = "no such endpoint" if status == 404 else f"method {request.method} not allowed"
        mon.observe_request("unknown", status, 0.0)
        return json_response(
            {
                "error": msg,
                "field": "path" if status == 404 else "method",
                "expected": "an endpoint listed in /openapi.json",
                "request_id": rid,
            },
            status_code=status,
            headers={"X-Request-Id": rid, **(getattr(exc, "headers", None) or {})},
        )

    v2m = "/v2/models/{model}"
    routes = [
        Route("/predict", endpoint("predict", predict), methods=["POST"]),
        Route("/health", endpoint("health", health, timed=False), methods=["GET"]),
        Route(
            "/admin/reload", endpoint("admin_reload", admin_reload, timed=False), methods=["POST"]
        ),
        Route("/metrics", endpoint("metrics", metrics, timed=False), methods=["GET"]),
        Route("/openapi.json", endpoint("openapi", openapi_json, timed=False), methods=["GET"]),
        Route("/v2", endpoint("v2_server", v2_server, timed=False), methods=["GET"]),
        Route("/v2/health/live", endpoint("v2_live", v2_live, timed=False), methods=["GET"]),
        Route("/v2/health/ready", endpoint("v2_ready", v2_ready, timed=False), methods=["GET"]),
        Route(v2m, endpoint("v2_metadata", v2_metadata, timed=False), methods=["GET"]),
        Route(
            v2m + "/versions/{version}",
            endpoint("v2_metadata", v2_metadata, timed=False),
            methods=["GET"],
        ),
        Route(v2m + "/ready", endpoint("v2_model_ready", v2_model_ready), methods=["GET"]),
        Route(
            v2m + "/versions/{version}/ready",
            endpoint("v2_model_ready", v2_model_ready),
            methods=["GET"],
        ),
        Route(v2m + "/infer", endpoint("v2_infer", v2_infer), methods=["POST"]),
        Route(v2m + "/versions/{version}/infer", endpoint("v2_infer", v2_infer), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.service = svc
    return app


def _check_admin(request: Any, svc: GuardService) -> None:
    """401 without a bearer token, 403 with a wrong one or when no admin token is set."""
    if svc.admin_token is None:
        raise RequestError(
            403,
            "the admin endpoints are off: no admin token is configured",
            field="Authorization",
            expected="advx serve --admin-token T (or ADVX_ADMIN_TOKEN)",
        )
    auth = request.headers.get("authorization") or ""
    if not auth.lower().startswith("bearer ") or not auth[7:].strip():
        raise RequestError(
            401,
            "missing admin token",
            field="Authorization",
            expected="Authorization: Bearer <the admin token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(auth[7:].strip().encode(), svc.admin_token.encode()):
        raise RequestError(
            403,
            "wrong admin token",
            field="Authorization",
            expected="Authorization: Bearer <the admin token>",
        )


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def json_response(
    doc: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Any:
    """JSON without NaN or infinities (which JSON lacks): any such number is sent as null, so a
    model that misbehaves on one input cannot turn the answer into a server error."""
    from starlette.responses import Response

    try:
        body = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    except ValueError:
        body = json.dumps(_finite(doc), allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def _is_json(ctype: str) -> bool:
    media = ctype.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _check_batch(rows: Any, name: str, svc: GuardService) -> None:
    if not isinstance(rows, list):
        raise RequestError(
            400,
            f"'{name}' is a JSON {_json_type(rows)}, not a list",
            field=name,
            expected=f"a list of inputs, each of shape {list(svc.shape)}",
        )
    if not rows:
        raise RequestError(400, f"'{name}' is empty", field=name, expected="at least one input")
    if len(rows) > svc.max_rows:
        raise RequestError(
            413,
            f"'{name}' has {len(rows)} inputs; the limit is {svc.max_rows}",
            field=name,
            expected=f"at most {svc.max_rows} inputs per request",
        )


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number"
    )


def _split_binary(raw: bytes, header_len: str | None) -> tuple[bytes, bytes | None]:
    if header_len is None:
        return raw, None
    try:
        n = int(header_len)
    except ValueError:
        n = -1
    if not 0 <= n <= len(raw):
        raise RequestError(
            400,
            f"Inference-Header-Content-Length {header_len[:20]!r} does not fit the body of "
            f"{len(raw)} bytes",
            field="Inference-Header-Content-Length",
            expected="the byte length of the JSON header at the start of the body",
        )
    return raw[:n], raw[n:]


def _v2_parse(
    doc: Any, binary: bytes, svc: GuardService
) -> tuple[Tensor, list[tuple[str, bool]], bool, str | None]:
    """The request's one input tensor ``(N, *shape)``, the outputs asked for (name, binary?),
    whether binary output is the default, and the request's ``id``."""
    if not isinstance(doc, dict):
        raise RequestError(
            400,
            f"the inference request is a JSON {_json_type(doc)}",
            field="body",
            expected='an object such as {"inputs": [{"name", "shape", "datatype", "data"}]}',
        )
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise RequestError(400, "'id' is not a string", field="id", expected="a string")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(
            400, "'parameters' is not an object", field="parameters", expected="an object"
        )
    binary_out = params.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise RequestError(
            400,
            "'binary_data_output' is not a boolean",
            field="parameters.binary_data_output",
            expected="true or false",
        )
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} inputs" if isinstance(inputs, list) else _json_type(inputs)
        raise RequestError(
            400,
            f"'inputs' must hold exactly one tensor, got {got}",
            field="inputs",
            expected=f"one tensor of shape [N, {', '.join(map(str, svc.shape))}]",
        )
    t = inputs[0]
    f = "inputs[0]"
    if not isinstance(t, dict):
        raise RequestError(
            400,
            f"{f} is not an object",
            field=f,
            expected="an object with name, shape, datatype, data",
        )
    if not isinstance(t.get("name"), str):
        raise RequestError(400, f"{f}.name is missing", field=f"{f}.name", expected="a string")
    shape = t.get("shape")
    want = [-1, *svc.shape]
    if (
        not isinstance(shape, list)
        or len(shape) != len(want)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or list(shape[1:]) != list(svc.shape)
        or shape[0] < 1
    ):
        raise RequestError(
            400,
            f"{f}.shape is {str(shape)[:80]}, expected {want}",
            field=f"{f}.shape",
            expected=f"{want} with N >= 1",
        )
    n = shape[0]
    if n > svc.max_rows:
        raise RequestError(
            413,
            f"{f} has {n} inputs; the limit is {svc.max_rows}",
            field=f"{f}.shape",
            expected=f"at most {svc.max_rows} inputs",
        )
    count = n * math.prod(svc.shape)
    dtype_name = t.get("datatype")
    if dtype_name not in _V2_DTYPES:
        raise RequestError(
            400,
            f"{f}.datatype {str(dtype_name)[:20]!r} is not a numeric type this model takes",
            field=f"{f}.datatype",
            expected=" | ".join(_V2_DTYPES),
        )
    np_dtype = np.dtype(_V2_DTYPES[dtype_name]).newbyteorder("<")
    tparams = t.get("parameters", {})
    if not isinstance(tparams, dict):
        raise RequestError(
            400, f"{f}.parameters is not an object", field=f"{f}.parameters", expected="an object"
        )
    size = tparams.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise RequestError(
                400,
                f"{f}.parameters.binary_data_size is {str(size)[:20]}, but "
                f"{len(binary)} bytes follow the header",
                field=f"{f}.parameters.binary_data_size",
                expected=f"{len(binary)}",
            )
        if size != count * np_dtype.itemsize:
            raise RequestError(
                400,
                f"{f} has {size} bytes of data; shape {shape} of {dtype_name} needs "
                f"{count * np_dtype.itemsize}",
                field=f"{f}.parameters.binary_data_size",
                expected=f"{count * np_dtype.itemsize}",
            )
        arr = np.frombuffer(binary, dtype=np_dtype)
    else:
        if binary:
            raise RequestError(
                400,
                f"{len(binary)} binary bytes follow the header but no input declares them",
                field=f"{f}.parameters.binary_data_size",
                expected=f"{len(binary)}",
            )
        data = t.get("data")
        if not isinstance(data, list):
            raise RequestError(
                400,
                f"{f}.data is missing or not a list",
                field=f"{f}.data",
                expected=f"{count} numbers (flat or nested)",
            )
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError):
            arr = np.asarray([], dtype=object)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise RequestError(
                400,
                f"{f}.data is not a rectangular array of numbers",
                field=f"{f}.data",
                expected=f"{count} numbers (flat or nested)",
            )
        if arr.size != count:
            raise RequestError(
                400,
                f"{f}.data holds {arr.size} values; shape {shape} needs {count}",
                field=f"{f}.data",
                expected=f"{count} values",
            )
        if (dtype_name == "BOOL") != (arr.dtype.kind == "b") and arr.size:
            raise RequestError(
                400,
                f"{f}.data does not match datatype {dtype_name}",
                field=f"{f}.data",
                expected=f"values of type {dtype_name}",
            )
    x = torch.from_numpy(arr.astype(np.float32).reshape(n, *svc.shape))
    outputs: list[tuple[str, bool]] = []
    req_outputs = doc.get("outputs")
    if req_outputs is None:
        outputs = [(o, binary_out) for o in V2_OUTPUTS]
    else:
        if not isinstance(req_outputs, list):
            raise RequestError(
                400, "'outputs' is not a list", field="outputs", expected="a list of {name}"
            )
        for k, o in enumerate(req_outputs):
            name = o.get("name") if isinstance(o, dict) else None
            if name not in V2_OUTPUTS:
                raise RequestError(
                    404 if isinstance(name, str) else 400,
                    f"outputs[{k}].name {str(name)[:40]!r} is not an output",
                    field=f"outputs[{k}].name",
                    expected=" | ".join(V2_OUTPUTS),
                )
            op = o.get("parameters", {})
            b = op.get("binary_data", binary_out) if isinstance(op, dict) else binary_out
            outputs.append((name, bool(b)))
    return x, outputs, binary_out, req_id


def _v2_metadata(svc: GuardService) -> dict[str, Any]:
    return {
        "name": svc.name,
        "versions": ["1", svc.guard.version],
        "platform": "pytorch_advx_guard",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *svc.shape]}],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [-1, svc.num_classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "predicted", "datatype": "INT64", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "action", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"policy_hash": svc.guard.policy.hash, "model_version": svc.guard.version},
    }


def _v2_response(
    served: _Served,
    outputs: list[tuple[str, bool]],
    binary_out: bool,
    req_id: str | None,
    svc: GuardService,
) -> Any:
    from starlette.responses import Response

    n = len(served.decisions)
    c = svc.num_classes
    tensors: dict[str, tuple[str, list[int], np.ndarray | list[str]]] = {}
    scores = np.zeros((n, c), dtype=np.float32)
    for i, s in enumerate(served.scores):
        if s is not None:
            scores[i] = s
    tensors["scores"] = ("FP32", [n, c], scores)
    tensors["label"] = (
        "INT64",
        [n],
        np.asarray([-1 if d.label is None else d.label for d in served.decisions], dtype=np.int64),
    )
    tensors["predicted"] = (
        "INT64",
        [n],
        np.asarray(
            [-1 if d.predicted is None else d.predicted for d in served.decisions], dtype=np.int64
        ),
    )
    tensors["confidence"] = (
        "FP32",
        [n],
        np.asarray(
            [math.nan if d.confidence is None else d.confidence for d in served.decisions],
            dtype=np.float32,
        ),
    )
    tensors["action"] = ("BYTES", [n], [d.action for d in served.decisions])
    out_docs = []
    chunks: list[bytes] = []
    for name, binary in outputs:
        dtype, shape, value = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": shape}
        if binary:
            blob = (
                _bytes_tensor(value)  # type: ignore[arg-type]
                if dtype == "BYTES"
                else np.ascontiguousarray(
                    value, dtype=np.asarray(value).dtype.newbyteorder("<")
                ).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            chunks.append(blob)
        elif dtype == "BYTES":
            entry["data"] = list(value)
        else:
            arr = np.asarray(value).reshape(-1)
            # JSON has no NaN: a missing confidence is sent as -1 in the JSON form
            entry["data"] = [
                (-1.0 if isinstance(v, float) and math.isnan(v) else v) for v in arr.tolist()
            ]
        out_docs.append(entry)
    doc: dict[str, Any] = {
        "model_name": svc.name,
        "model_version": served.version,
        "outputs": out_docs,
        "parameters": {
            # v2 parameters are scalars: the decisions travel as one JSON string
            "decisions": json.dumps([d.to_json() for d in served.decisions]),
            "policy_hash": served.policy_hash,
            "model_version": served.version,
        },
    }
    if req_id is not None:
        doc["id"] = req_id
    if not chunks:
        return json_response(doc)
    head = json.dumps(doc).encode()
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


# ---------------------------------------------------------------------------------------------
# OpenAPI


def openapi_document(svc: GuardService) -> dict[str, Any]:
    """An OpenAPI 3.0 description of every endpoint, as the fuzzer and clients see them."""
    shape = list(svc.shape)
    lo, hi = svc.guard.bounds
    row: dict[str, Any] = {"type": "number", "minimum": lo, "maximum": hi}
    for d in reversed(shape):
        row = {"type": "array", "items": row, "minItems": d, "maxItems": d}
    err = {
        "type": "object",
        "required": ["error", "request_id"],
        "properties": {
            "error": {"type": "string"},
            "field": {"type": "string"},
            "expected": {"type": "string"},
            "request_id": {"type": "string"},
        },
    }
    decision = {
        "type": "object",
        "required": ["action", "label", "predicted", "confidence", "scores", "reasons"],
        "properties": {
            "action": {
                "type": "string",
                "enum": ["accept", "fallback", "abstain", "review", "reject"],
            },
            "label": {"type": "integer", "nullable": True},
            "predicted": {"type": "integer", "nullable": True},
            "confidence": {"type": "number", "nullable": True},
            "scores": {"type": "object", "additionalProperties": {"type": "number"}},
            "reasons": {"type": "array", "items": {"type": "string"}},
            "model_version": {"type": "string"},
            "policy_hash": {"type": "string"},
        },
    }

    def errors(*codes: int) -> dict[str, Any]:
        text = {
            400: "Malformed request (the body names the field)",
            401: "Unknown API key",
            404: "No such model or output",
            413: "Body or batch too large",
            415: "Unsupported media type or encoding",
            422: "No valid input (each row's reason under 'rows')",
            429: "Query budget exhausted (Retry-After)",
            500: "Internal error",
            503: "Timed out or review queue unavailable",
        }
        return {
            str(c): {"description": text[c], "content": {"application/json": {"schema": err}}}
            for c in codes
        }

    def ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
        return {
            "200": {"description": description, "content": {"application/json": {"schema": schema}}}
        }

    any_obj = {"type": "object"}
    tensor_in = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {
                "type": "array",
                "items": {"type": "integer"},
                "minItems": len(shape) + 1,
                "maxItems": len(shape) + 1,
            },
            "datatype": {"type": "string", "enum": list(_V2_DTYPES)},
            "data": {"type": "array", "items": {}},
            "parameters": {"type": "object"},
        },
    }
    infer_req = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_output": {"type": "boolean"}},
            },
            "inputs": {"type": "array", "items": tensor_in, "minItems": 1, "maxItems": 1},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": list(V2_OUTPUTS)},
                        "parameters": {"type": "object"},
                    },
                },
            },
        },
    }
    infer_resp = {
        "type": "object",
        "required": ["model_name", "outputs", "parameters"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {
                    "decisions": {"type": "string", "description": "JSON list of decisions"}
                },
            },
            "outputs": {"type": "array", "items": {"type": "object"}},
        },
    }
    # one model is served: naming any other is a 404, which the document says
    model_param = {
        "name": "model",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": [svc.name]},
    }
    version_param = {
        "name": "version",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": ["1", svc.guard.version]},
    }
    auth = [
        {
            "name": "X-Client-Id",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:/+=-]{1,128}$"},
        },
        {"name": "X-Request-Id", "in": "header", "required": False, "schema": {"type": "string"}},
    ]
    if svc.api_keys is not None:
        auth.append(
            {
                "name": "Authorization",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "pattern": "^Bearer .+$"},
            }
        )
    infer_codes = errors(400, 401, 404, 413, 415, 422, 429, 500, 503)

    def infer_op(params: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "summary": "Open Inference Protocol v2 inference (JSON or binary tensors)",
            "parameters": params + auth,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": infer_req},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "200": {
                    "description": "Outputs; the guard's decisions in parameters",
                    "content": {
                        "application/json": {"schema": infer_resp},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                **infer_codes,
            },
        }

    meta_ok = ok(any_obj, "Model metadata")
    paths: dict[str, Any] = {
        "/predict": {
            "post": {
                "summary": "advx black-box protocol: scores, labels and the guard's decisions",
                "parameters": auth,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["inputs"],
                                "properties": {
                                    "inputs": {
                                        "type": "array",
                                        "items": row,
                                        "minItems": 1,
                                        "maxItems": svc.max_rows,
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    **ok(
                        {
                            "type": "object",
                            "required": ["scores", "labels", "decisions"],
                            "properties": {
                                "scores": {
                                    "type": "array",
                                    "items": {
                                        "type": "array",
                                        "items": {"type": "number"},
                                        "nullable": True,
                                    },
                                },
                                "labels": {
                                    "type": "array",
                                    "items": {"type": "integer", "nullable": True},
                                },
                                "decisions": {"type": "array", "items": decision},
                                "model_version": {"type": "string"},
                                "policy_hash": {"type": "string"},
                                "request_id": {"type": "string"},
                            },
                        }
                    ),
                    **errors(400, 401, 413, 415, 422, 429, 500, 503),
                },
            }
        },
        "/health": {
            "get": {"summary": "Liveness, versions, drift verdicts", "responses": ok(any_obj)}
        },
        "/admin/reload": {
            "post": {
                "summary": "Serve the model directory's current version (advx serve --model-dir)",
                "description": "Authenticated by the admin token. A version that fails to load "
                "is not served: the answer has ok false, the version still served and the reason.",
                "responses": {
                    **ok(
                        {
                            "type": "object",
                            "required": ["ok", "version"],
                            "properties": {
                                "ok": {"type": "boolean"},
                                "changed": {"type": "boolean"},
                                "version": {"type": "string"},
                                "reason": {"type": "string"},
                            },
                        }
                    ),
                    **errors(401),
                    **{
                        str(c): {
                            "description": why,
                            "content": {"application/json": {"schema": err}},
                        }
                        for c, why in (
                            (403, "Wrong admin token, or none configured"),
                            (409, "Not serving a model directory"),
                        )
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": ok(any_obj)}},
        "/v2": {"get": {"summary": "Server metadata", "responses": ok(any_obj)}},
        "/v2/health/live": {"get": {"summary": "Liveness", "responses": ok(any_obj)}},
        "/v2/health/ready": {"get": {"summary": "Readiness", "responses": ok(any_obj)}},
        "/v2/models/{model}": {
            "get": {
                "summary": "Model metadata",
                "parameters": [model_param],
                "responses": {**meta_ok, **errors(404)},
            }
        },
        "/v2/models/{model}/versions/{version}": {
            "get": {
                "summary": "Model metadata",
                "parameters": [model_param, version_param],
                "responses": {**meta_ok, **errors(404)},
            }
        },
        "/v2/models/{model}/ready": {
            "get": {
                "summary": "Model readiness",
                "parameters": [model_param],
                "responses": {**ok(any_obj), **errors(404, 503)},
            }
        },
        "/v2/models/{model}/versions/{version}/ready": {
            "get": {
                "summary": "Model readiness",
                "parameters": [model_param, version_param],
                "responses": {**ok(any_obj), **errors(404, 503)},
            }
        },
        "/v2/models/{model}/infer": {"post": infer_op([model_param])},
        "/v2/models/{model}/versions/{version}/infer": {
            "post": infer_op([model_param, version_param])
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": f"advx guard: {svc.name}",
            "version": __version__,
            "description": "A model guarded by advx (validation, detection, abstention).",
        },
        "paths": paths,
    }
