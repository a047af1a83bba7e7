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


def _api_keys(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--api-keys: cannot read {path}: {e}") from None
    if (
        not isinstance(doc, dict)
        or not doc
        or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in doc.items())
    ):
        raise InputError(
            f"--api-keys: {path} must hold a JSON object of key -> client name, e.g. "
            '{"s3cret-key": "team-a"}'
        )
    return doc


def _queries(cfg: dict[str, Any], alerts: Any) -> Any:
    if cfg.get("detect_queries", "off") == "off" and not any(
        cfg.get(k) for k in ("rate", "budget")
    ):
        return None
    from ..guard.queries import QueryDetector

    return QueryDetector(
        rate=cfg.get("rate"),
        burst=cfg.get("burst"),
        budget=cfg.get("budget"),
        alerts=alerts,
        state=cfg.get("query_state"),
    )


class _BudgetOnly:
    """Rate limits and budgets without query-attack detection (--detect-queries off)."""

    def __init__(self, det: Any) -> None:
        self.det = det

    def admit(self, client: str, n: int) -> float | None:
        return self.det.admit(client, n)

    def observe(self, client: str, x: Any) -> list[tuple[bool, float]]:
        return [(False, 0.0)] * int(x.shape[0])


def build_app(cfg: dict[str, Any]) -> Any:
    from ..guard.service import create_app

    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg["torch_threads"]))

    guard = build_guard(cfg)
    store = None
    if cfg.get("store"):
        from .review import _open

        store = _open(cfg["store"])  # a bad URL or an unreachable database: exit 2 here
    queries = _queries(cfg, store)
    mode = cfg.get("detect_queries", "off")
    if queries is not None and mode == "off":
        queries = _BudgetOnly(queries)
    app = create_app(
        guard,
        name=cfg["name"],
        max_body_bytes=int(cfg["max_body_mb"] * 1024 * 1024),
        batch_window_ms=cfg["batch_window_ms"],
        max_batch=cfg["max_batch"],
        timeout_s=cfg["timeout"],
        queries=queries,
        review=store,
        alerts=store,
        detect_queries="silent" if mode == "silent" else "reject",
        api_keys=_api_keys(cfg.get("api_keys")),
    )
    if store is not None:
        store.set_classes(app.state.service.num_classes)
    return app


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
    "also $ADVX_STORE): inputs the guard holds back are stored before the answer is sent.",
)
@click.option(
    "--detect-queries",
    type=click.Choice(["off", "reject", "silent"]),
    default="off",
    show_default=True,
    help="Query-attack detection: reject flagged inputs openly, or answer them silently from "
    "the fallback (an attacker is not told).",
)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Inputs per second per client (token bucket; 429 beyond it).",
)
@click.option("--burst", type=click.FloatRange(1), default=None, help="Token bucket size.")
@click.option("--budget", type=click.IntRange(1), default=None, help="Inputs per client per day.")
@click.option(
    "--query-state",
    default=None,
    metavar="redis://...",
    help="Share query memory and budgets between workers through Redis.",
)
@click.option(
    "--api-keys",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON file of API key -> client name; then every request needs "
    '"Authorization: Bearer KEY".',
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
    detect_queries,
    rate,
    burst,
    budget,
    query_state,
    api_keys,
    device,
    torch_threads,
    log_level,
) -> None:
    """Serve a guarded model: POST /predict, /v2/models/NAME/infer, /health, /metrics."""
    try:
        import uvicorn
    except ImportError:
        raise InputError("advx serve needs the service extras: pip install 'advx[guard]'") from None
    if model_spec is None:
        raise InputError("--model is required, e.g. --model lenet --weights lenet.pt")
    cfg = {
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
        "store": store,
        "detect_queries": detect_queries,
        "rate": rate,
        "burst": burst,
        "budget": budget,
        "query_state": query_state,
        "api_keys": api_keys,
    }
    if workers > 1 and query_state is None and (detect_queries != "off" or rate or budget):
        info(
            "advx serve: each worker keeps its own query memory and budgets; pass "
            "--query-state redis://... to share them"
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
    common: dict[str, Any] = dict(
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(timeout, 5),
    )
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
