"""``advx serve``: serve a guarded model over HTTP (advx protocol and Open Inference Protocol v2).

Everything that can be wrong with the command line — a model that does not load, a corrupt
policy, a policy calibrated for another model, an input shape the model cannot take — is found
before the server binds its port, and ends with a one-line message and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import AdvxError, InputError
from . import cli
from ._common import build_classifier, info, model_options, pick_device

_CONFIG_ENV = "ADVX_SERVE_CONFIG"
ADMIN_TOKEN_ENV = "ADVX_ADMIN_TOKEN"  # read from the environment: never in argv or the config
# shapes tried, in order, when --input-shape is not given (MNIST-like, CIFAR-like, ImageNet-like)
_PROBE_SHAPES = ((1, 28, 28), (3, 32, 32), (3, 224, 224))


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise InputError(
            f"--input-shape: expected positive sizes such as 1,28,28 (one input, no batch), "
            f"got {text!r}"
        )
    return shape


def _probe_shape(model: Any) -> tuple[int, ...]:
    import torch

    lo, hi = model.bounds
    for shape in _PROBE_SHAPES:
        try:
            with torch.no_grad():
                out = model.scores(torch.full((1, *shape), (lo + hi) / 2))
        except Exception:
            continue
        if out.dim() == 2:
            return shape
    raise InputError(
        "--input-shape: the model takes none of "
        f"{', '.join(','.join(map(str, s)) for s in _PROBE_SHAPES)}; give its input shape, "
        "e.g. --input-shape 1,28,28"
    )


def build_guard(cfg: dict[str, Any]) -> Any:
    """The Guard the command line describes (``cfg``: the options as JSON-able values)."""
    from ..guard import Guard, Policy

    if cfg.get("model_dir"):
        return _reloader(cfg).load()
    spec = cfg["model"]
    try:
        model = build_classifier(
            spec,
            cfg.get("weights"),
            cfg.get("mean"),
            cfg.get("std"),
            cfg.get("bounds", "0,1"),
            pick_device(cfg.get("device")),
        )
    except AdvxError:
        raise
    except Exception as e:  # a broken file or factory: say which and why, not a traceback
        raise InputError(f"--model: cannot load {spec!r}: {type(e).__name__}: {e}") from None
    shape = tuple(cfg["input_shape"]) if cfg.get("input_shape") else _probe_shape(model)
    path = cfg.get("policy")
    if path is None:
        # the default guard: validate, abstain below 0.5 confidence
        return Guard(model, input_shape=shape)
    if not Path(path).is_file():
        raise InputError(f"--policy: no file {path}")
    load = getattr(Policy, "load", None)
    if load is None:
        raise InputError("--policy: this advx has no Policy.load; serve without --policy")
    try:
        policy = load(path)
    except AdvxError:
        raise
    except Exception as e:
        raise InputError(f"--policy: cannot read {path}: {type(e).__name__}: {e}") from None
    from_policy = getattr(Guard, "from_policy", None)
    try:
        if from_policy is not None:
            return from_policy(model, policy, input_shape=shape)
        return Guard(model, policy=policy, input_shape=shape)
    except AdvxError as e:
        raise InputError(f"--policy {path}: {e}") from None


def parse_api_keys(pairs: tuple[str, ...] | list[str] | None) -> dict[str, str] | None:
    """``KEY=CLIENT`` pairs -> {key: client}; None when there are none."""
    if not pairs:
        return None
    keys: dict[str, str] = {}
    for pair in pairs:
        key, sep, client = pair.partition("=")
        if not sep or not key.strip() or not client.strip():
            raise InputError(f"--api-key: expected KEY=CLIENT, got {pair.split('=')[0][:4]}...")
        keys[key.strip()] = client.strip()
    return keys


def build_queries(cfg: dict[str, Any], shape: tuple[int, ...], *, alerts: Any = None) -> Any:
    """The query monitor the options describe (stateful detection, rate limit, budget), or None
    when all three are off."""
    mode = cfg.get("detect_queries", "reject")
    rate, budget = cfg.get("rate_limit"), cfg.get("query_budget")
    if mode == "off" and rate is None and budget is None:
        return None
    import math

    from ..guard.queries import QueryDetector, preset_for

    spec = preset_for(shape)
    if mode != "off" and math.prod(shape) < spec.window:
        raise InputError(
            f"--detect-queries: inputs of {math.prod(shape)} values are too small to fingerprint "
            f"(windows of {spec.window}); serve with --detect-queries off"
        )
    return QueryDetector(
        spec=spec,
        state=cfg.get("state"),
        rate=rate,
        burst=cfg.get("burst"),
        budget=budget,
        detect=mode != "off",
        alerts=alerts,
    )


def _reloader(cfg: dict[str, Any]) -> Any:
    """The model directory a --model-dir service serves and reloads from."""
    from ..guard.reload import ModelDirReloader

    kw = {"input_shape": cfg["input_shape"]} if cfg.get("input_shape") else {}
    return ModelDirReloader(cfg["model_dir"], device=pick_device(cfg.get("device")), **kw)


def _store_url(store: str | None) -> str | None:
    """--store: a URL, 'off', or (not given) the embedded default under the state directory."""
    if store is not None and store.strip().lower() in ("off", "none", ""):
        return None
    if store is not None:
        return store
    try:
        from ..guard.store import default_url
    except ImportError:  # no SQLAlchemy: serve without a queue rather than refuse to start
        return None
    return default_url()


def build_app(cfg: dict[str, Any]) -> Any:
    from ..guard.service import create_app

    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg["torch_threads"]))

    reloader = _reloader(cfg) if cfg.get("model_dir") else None
    guard = reloader.load() if reloader is not None else build_guard(cfg)
    shape = tuple(guard.input_shape) if guard.input_shape else tuple(cfg["input_shape"] or ())
    store = None
    if cfg.get("store"):
        from .review import _open

        store = _open(cfg["store"])  # a bad URL or an unreachable database: exit 2 here
    queries = build_queries(cfg, shape, alerts=store)
    mode = cfg.get("detect_queries", "reject")
    app = create_app(
        guard,
        reloader=reloader,
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
        name=cfg["name"],
        max_body_bytes=int(cfg["max_body_mb"] * 1024 * 1024),
        batch_window_ms=cfg["batch_window_ms"],
        max_batch=cfg["max_batch"],
        timeout_s=cfg["timeout"],
        queries=queries,
        review=store,  # alerts go through the query detector, which rate-limits them per client
        detect_queries="silent" if mode == "silent" else "reject",
        api_keys=cfg.get("api_keys"),
    )
    if store is not None:
        store.set_classes(app.state.service.num_classes)
    if queries is not None:
        _query_metrics(app, queries)
    return app


def _query_metrics(app: Any, queries: Any) -> None:
    """Gauges of the query detector in the app's /metrics: whether its shared state (Redis) is
    unreachable (answering from this process's memory), and the queries it remembers."""
    from prometheus_client import Gauge

    registry = app.state.service.monitor.registry
    Gauge(
        "advx_guard_query_state_degraded",
        "1 while the shared query state (Redis) is unreachable and this process answers alone",
        registry=registry,
    ).set_function(lambda: float(queries.degraded))
    Gauge(
        "advx_guard_queries_remembered",
        "Queries held by the account-oblivious query memory",
        registry=registry,
    ).set_function(lambda: float(queries.state.remembered()))


def app_factory() -> Any:
    """Build the app in a uvicorn worker process (``--workers N``) from the parent's options."""
    _setup_logging(os.environ.get("ADVX_SERVE_LOG_LEVEL", "info"))
    return build_app(json.loads(os.environ[_CONFIG_ENV]))


def _setup_logging(level: str) -> None:
    from ..guard.service import JsonLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    for name in ("advx.guard", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def _reload_on_sighup(app: Any, workers: int) -> None:
    """SIGHUP: serve the model directory's current version. The reload runs in its own thread
    (a signal handler must return at once); requests keep being answered meanwhile. With
    several workers uvicorn's supervisor takes SIGHUP and restarts them, each loading the
    current version."""
    import signal
    import threading

    if workers != 1 or not hasattr(signal, "SIGHUP"):
        return
    svc = app.state.service

    def on_hup(signum: int, frame: Any) -> None:
        threading.Thread(
            target=svc.reloader.reload, args=(svc,), name="advx-reload", daemon=True
        ).start()

    signal.signal(signal.SIGHUP, on_hup)


def _default_name(spec: str) -> str:
    base = Path(spec.split(":")[0]).stem or "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:64] or "model"


@cli.command("serve")
@model_options
@click.option(
    "--policy",
    type=click.Path(dir_okay=False),
    default=None,
    help="A calibrated policy (advx guard calibrate); default: validate and abstain "
    "below 0.5 confidence.",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Serve a versioned model directory's current version (advx guard init/update); "
    "reload it on SIGHUP or POST /admin/reload. Replaces --model and --policy.",
)
@click.option(
    "--admin-token",
    default=None,
    help=f"Bearer token for POST /admin/reload (default: ${ADMIN_TOKEN_ENV}; none: off).",
)
@click.option(
    "--name", default=None, help="The model's name in /v2/models/NAME (default: from --model)."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes (each loads the model; metrics are per process).",
)
@click.option(
    "--input-shape", default=None, help="Shape of one input, e.g. 1,28,28 (default: probed)."
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Most inputs per model pass (1: no dynamic batching).",
)
@click.option(
    "--batch-window-ms",
    type=click.FloatRange(0, 1000),
    default=2.0,
    show_default=True,
    help="How long a request waits for others to share its pass.",
)
@click.option("--max-body-mb", type=click.FloatRange(0.001, 1024), default=8.0, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(0.01, 3600),
    default=30.0,
    show_default=True,
    help="Seconds before a request is answered 503.",
)
@click.option(
    "--store",
    default=None,
    envvar="ADVX_STORE",
    metavar="URL",
    help="Review queue and alerts (SQLAlchemy URL: sqlite:///review.db, postgresql://...; "
    "also $ADVX_STORE): inputs the guard holds back are stored before the answer is sent. "
    "Default: a SQLite file under your state directory (printed at start-up); 'off' for none.",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
@click.option(
    "--torch-threads",
    type=click.IntRange(1, 256),
    default=None,
    help="torch's intra-op threads per server process (default: torch's choice; 1 is often "
    "fastest when the HTTP side and other processes share the cores).",
)
@click.option(
    "--detect-queries",
    type=click.Choice(["reject", "silent", "off"]),
    default="reject",
    show_default=True,
    help="Inputs flagged as part of a query attack (Blacklight-style fingerprints, all clients "
    "and per client): reject says so (and so tells an adaptive attacker which queries were "
    "caught), silent answers from the fallback or abstains without saying why, off detects "
    "nothing.",
)
@click.option(
    "--state",
    default=None,
    metavar="URL",
    help="redis://host:port/db: the query memory, rate limits and budgets shared by every "
    "worker and replica (default: in each process).",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    metavar="KEY=CLIENT",
    help="Require 'Authorization: Bearer KEY' and count its queries as CLIENT (repeatable); "
    "without keys a client is its X-Client-Id header, else its address.",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Inputs per second per client (token bucket; default: no limit).",
)
@click.option(
    "--burst",
    type=click.FloatRange(1),
    default=None,
    help="Bucket size for --rate-limit (default: 2 seconds' worth).",
)
@click.option(
    "--query-budget",
    type=click.IntRange(1),
    default=None,
    help="Inputs per client per day (default: no budget).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve_cmd(
    model_spec,
    weights,
    mean,
    std,
    bounds,
    policy,
    model_dir,
    admin_token,
    name,
    host,
    port,
    workers,
    input_shape,
    max_batch,
    batch_window_ms,
    max_body_mb,
    timeout,
    store,
    device,
    torch_threads,
    detect_queries,
    state,
    api_keys,
    rate_limit,
    burst,
    query_budget,
    log_level,
) -> None:
    """Serve a guarded model: POST /predict, /v2/models/NAME/infer, /health, /metrics."""
    try:
        import uvicorn
    except ImportError:
        raise InputError("advx serve needs the service extras: pip install 'advx[guard]'") from None
    if model_dir is not None:
        if model_spec is not None or policy is not None:
            raise InputError(
                "--model-dir serves the directory's current version: leave out --model and --policy"
            )
        model_spec = Path(model_dir).resolve().name  # for the default --name
    elif model_spec is None:
        raise InputError("--model is required, e.g. --model lenet --weights lenet.pt")
    if admin_token:
        # the workers read it from the environment; it never goes into the logged config
        os.environ[ADMIN_TOKEN_ENV] = admin_token
    cfg = {
        "model_dir": None if model_dir is None else str(Path(model_dir).resolve()),
        "model": model_spec,
        "weights": weights,
        "mean": mean,
        "std": std,
        "bounds": bounds,
        "policy": policy,
        "name": name or _default_name(model_spec),
        "input_shape": parse_shape(input_shape),
        "max_batch": max_batch,
        "batch_window_ms": batch_window_ms,
        "max_body_mb": max_body_mb,
        "timeout": timeout,
        "device": device,
        "torch_threads": torch_threads,
        "store": _store_url(store),
        "detect_queries": detect_queries,
        "state": state,
        "api_keys": parse_api_keys(api_keys),
        "rate_limit": rate_limit,
        "burst": burst,
        "query_budget": query_budget,
    }
    if workers > 1 and state is None and (detect_queries != "off" or rate_limit or query_budget):
        info(
            "advx serve: each worker keeps its own query memory and budgets; pass "
            "--state redis://... to share them"
        )
    _setup_logging(log_level)
    app = build_app(cfg)  # every start-up error surfaces here, before the port is bound
    svc = app.state.service
    cfg["input_shape"] = list(svc.shape)
    info(
        f"advx serve: {cfg['name']} (model {svc.guard.version}, policy {svc.guard.policy.hash}, "
        f"input {list(svc.shape)}, {svc.num_classes} classes) on http://{host}:{port} "
        f"— POST /predict, /v2/models/{cfg['name']}/infer; GET /health, /metrics"
    )
    if cfg["store"]:
        from ..guard.store import mask_url

        info(f"advx serve: review queue and alerts in {mask_url(cfg['store'])}")
    if detect_queries != "off":
        from ..guard.queries_redis import redact

        where = redact(state) if state else "this process"
        info(f"advx serve: query-attack detection {detect_queries}, state in {where}")
        if workers > 1 and not state:
            info(
                "advx serve: each worker keeps its own query memory; pass --state redis://... "
                "so that an attack spread over workers is seen whole"
            )
    common: dict[str, Any] = dict(
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(timeout, 5),
    )
    if model_dir is not None:
        _reload_on_sighup(app, workers)
    if workers == 1:
        uvicorn.run(app, **common)
    else:
        os.environ[_CONFIG_ENV] = json.dumps(cfg)
        os.environ["ADVX_SERVE_LOG_LEVEL"] = log_level
        import inspect

        if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
            # a worker loads torch and the model before it answers the supervisor's ping; on a
            # busy machine that takes longer than uvicorn's default, which then restarts it
            common["timeout_worker_healthcheck"] = 120
        uvicorn.run("advx.cli.serve:app_factory", factory=True, workers=workers, **common)
