"""Black boxes that live elsewhere: an ONNX file (onnxruntime) or a model behind HTTP (httpx).

The HTTP protocol (documented in the README) is one POST per batch:

    request:  {"inputs": [[...], ...]}          # a list of N inputs, each a nested list (C, H, W)
    response: {"scores": [[...], ...]}           # N rows of class scores   (kind="scores")
          or  {"labels": [3, 1, ...]}            # N class indices          (kind="labels")

Timeouts and connection errors are retried with exponential backoff; a server error (5xx) too;
a client error (4xx), malformed JSON or a wrong shape stop the attack with a ModelError that
says what came back. Every input sent is a query, charged to its sample.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, ModelError

__all__ = ["http_fn", "onnx_fn"]


def http_fn(
    url: str,
    *,
    kind: str = "scores",
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    headers: dict[str, str] | None = None,
) -> Callable[[Tensor], Any]:
    """A callable that sends a batch to ``url`` and returns the scores or labels it answers."""
    try:
        import httpx
    except ImportError:
        raise InputError("BlackBox.from_http needs httpx: pip install 'advx[http]'") from None
    if not str(url).startswith(("http://", "https://")):
        raise InputError(f"url: expected http://... or https://..., got {url!r}")
    if timeout <= 0 or retries < 0 or backoff < 0:
        raise InputError(
            f"timeout must be > 0, retries and backoff >= 0; got {timeout}, {retries}, {backoff}"
        )
    client = httpx.Client(timeout=timeout, headers=headers or {})
    key = "scores" if kind == "scores" else "labels"

    def fn(x: Tensor) -> Any:
        body = {"inputs": x.detach().to("cpu", torch.float32).tolist()}
        last: str = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                resp = client.post(url, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {timeout:g}s"
                continue
            except httpx.TransportError as e:
                last = f"cannot connect ({type(e).__name__}: {e})"
                continue
            if resp.status_code >= 500:
                last = f"server error {resp.status_code}: {resp.text[:200]!r}"
                continue
            if resp.status_code >= 400:
                raise ModelError(
                    f"{url} refused the request: {resp.status_code} {resp.text[:200]!r}"
                )
            try:
                doc = resp.json()
            except ValueError:
                raise ModelError(f"{url} answered malformed JSON: {resp.text[:200]!r}") from None
            if not isinstance(doc, dict) or key not in doc:
                raise ModelError(f"{url} answered JSON without a {key!r} field: {str(doc)[:200]!r}")
            return doc[key]
        raise ModelError(f"{url} failed after {retries + 1} attempt(s): {last}")

    fn.__name__ = f"http:{url}"
    fn.client = client  # type: ignore[attr-defined]
    return fn


def onnx_fn(
    path: str | os.PathLike,
    *,
    kind: str = "scores",
    output: int = 0,
    providers: list[str] | None = None,
) -> Callable[[Tensor], Any]:
    """A callable that runs an ONNX model with onnxruntime on a batch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("BlackBox.from_onnx needs onnxruntime: pip install 'advx[onnx]'") from None
    path = Path(path)
    if not path.exists():
        raise InputError(f"onnx: no file {path}")
    try:
        session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise InputError(f"onnx: cannot load {path}: {e}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(
            f"onnx: {path.name} takes {len(inputs)} inputs; advx needs a model with one (the batch)"
        )
    name = inputs[0].name
    dtype = (
        np.float16
        if "float16" in inputs[0].type
        else (np.float64 if "double" in inputs[0].type else np.float32)
    )

    def fn(x: Tensor) -> Any:
        out = session.run(None, {name: x.detach().to("cpu").numpy().astype(dtype, copy=False)})[
            output
        ]
        if kind == "labels" and out.ndim == 2 and out.shape[1] > 1:
            return out.argmax(axis=1)  # the file returns scores; only the labels are disclosed
        return out

    fn.__name__ = f"onnx:{path.name}"
    return fn
