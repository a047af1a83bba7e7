"""The review page: a person sees each queued input, the model's prediction and scores, and
labels it with one click (``advx review serve``).

A small Starlette app over a :class:`~advx.guard.store.Store`:

- ``GET /``: the queue (``?status=labelled`` for what is done), each image inline as a PNG;
- ``POST /items/{id}/label``: a form post (``label=K``) from the page's buttons; the label goes
  to the database and the page comes back without the item;
- ``GET /api/items`` and ``POST /api/items/{id}/label`` (JSON ``{"label": K, "by": "..."}``) for
  scripts. A bad label answers 400 with a JSON body naming the field; an unknown item 404.

It has no login: serve it on 127.0.0.1 (the default) or behind a proxy that authenticates.
Needs the ``guard`` extra (starlette, jinja2, Pillow).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..errors import InputError
from .store import STATUSES, Store

__all__ = ["review_app", "to_png"]


def review_app(
    store: Store, *, by: str, limit: int = 50, allowed_hosts: Sequence[str] | None = None
) -> Any:
    """The review page's ASGI app; labels are recorded as given by ``by``.

    ``allowed_hosts`` (e.g. ``["127.0.0.1", "localhost"]``) refuses requests for any other
    ``Host``, which stops a DNS-rebinding page from reaching a reviewer's local server.
    """
    try:
        import jinja2
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
        from starlette.routing import Route
    except ImportError as e:
        raise InputError(
            f"the review page needs starlette and jinja2 ({e.name} is missing): "
            "pip install 'advx[guard]'"
        ) from None
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("advx.guard", "templates"),
        autoescape=True,  # client names and reasons come from outside: escape them
    )
    template = env.get_template("review.html.j2")

    def _error(status: int, field: str, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "field": field}, status_code=status)

    def _label(item_id: str, label: Any, who: Any) -> Response | dict:
        if not item_id.isdigit() or int(item_id) < 1:
            return _error(404, "id", f"no review item {item_id!r}")
        if isinstance(label, str):
            label = label.strip()
            if not label.lstrip("-").isdigit():
                return _error(400, "label", f"label: expected a class index, got {label!r}")
            label = int(label)
        try:
            item = store.label(int(item_id), label, by=str(who or by))
        except InputError as e:
            message = str(e)
            if message.startswith("id:"):
                return _error(404, "id", message)
            return _error(400, message.split(":", 1)[0], message)
        item.pop("input")  # the page and scripts have it already; arrays are not JSON
        return item

    # the database calls block: the page and the JSON listing run in Starlette's thread pool
    # (plain def), the posts hand their label to it
    def page(request: Request) -> Response:
        status = request.query_params.get("status", "queued")
        if status not in STATUSES:
            return _error(400, "status", f"status: expected one of {', '.join(STATUSES)}")
        items = store.list(status=status, limit=limit)
        for item in items:
            item["png"] = _png_b64(store.get(item["id"])["input"])
            probs = item["probs"] or []
            item["top"] = sorted(enumerate(probs), key=lambda kp: -kp[1])[:3]
        html = template.render(
            items=items,
            status=status,
            counts={s: store.count(status=s) for s in STATUSES},
            classes=store.classes,
            store=store.masked_url,
            by=by,
        )
        return HTMLResponse(html)

    def _cross_site(request: Request) -> Response | None:
        """A label post from another site's page (the browser says where it came from) is
        refused: labels become training data, a forged one is a poisoning attack."""
        source = request.headers.get("origin") or request.headers.get("referer")
        if source is None:
            return None  # not a browser (curl, a script): nothing to forge with
        if urlsplit(source).netloc != request.headers.get("host", ""):
            return _error(403, "origin", f"labels are posted from the review page, not {source}")
        return None

    async def form_label(request: Request) -> Response:
        refused = _cross_site(request)
        if refused is not None:
            return refused
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(body).items()}
        if "label" not in form:
            return _error(400, "label", "label: the form sent no label")
        done = await run_in_threadpool(
            _label, request.path_params["id"], form["label"], form.get("by")
        )
        if isinstance(done, Response):
            return done
        back = request.scope.get("root_path", "") + "/"
        return RedirectResponse(back, status_code=303)

    def api_items(request: Request) -> Response:
        status = request.query_params.get("status", "queued")
        try:
            limit_ = int(request.query_params.get("limit", limit))
            return JSONResponse(store.list(status=status, limit=limit_))
        except (InputError, ValueError) as e:
            field = "status" if "status" in str(e) else "limit"
            return _error(400, field, str(e))

    async def api_label(request: Request) -> Response:
        refused = _cross_site(request)
        if refused is not None:
            return refused
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # a cross-site form can post text/plain that parses as JSON; JSON cannot be sent
            # cross-site without the browser asking first
            return _error(415, "content-type", "send the label as application/json")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body", 'expected a JSON body such as {"label": 3}')
        if not isinstance(body, dict) or "label" not in body:
            return _error(400, "label", 'label: expected a JSON body such as {"label": 3}')
        done = await run_in_threadpool(
            _label, request.path_params["id"], body["label"], body.get("by")
        )
        return done if isinstance(done, Response) else JSONResponse(done)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/items/{id}/label", form_label, methods=["POST"]),
            Route("/api/items", api_items),
            Route("/api/items/{id}/label", api_label, methods=["POST"]),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
        if allowed_hosts
        else [],
    )


def to_png(x: Any) -> bytes | None:
    """An input as PNG bytes, when it is an image: (C, H, W) with C in {1, 3}, (H, W), or a flat
    square; values in [0, 1] (clipped, so an out-of-range input still shows)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    if not isinstance(x, np.ndarray) or x.size == 0:
        return None
    a = x
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]  # a batch of one
    if a.ndim == 1:
        side = math.isqrt(a.size)
        if side * side != a.size:
            return None
        a = a.reshape(side, side)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        return None
    pixels = (np.nan_to_num(a, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_b64(x: Any) -> str | None:
    png = to_png(x)
    return None if png is None else base64.b64encode(png).decode("ascii")
