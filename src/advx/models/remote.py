"""Black boxes that live elsewhere: an ONNX file (onnxruntime) or a model behind HTTP (httpx).

Two wire formats, one POST per batch. advx's own (``protocol="advx"``, documented in the README):

    request:  {"inputs": [[...], ...]}          # a list of N inputs, each a nested list (C, H, W)
    response: {"scores": [[...], ...]}           # N rows of class scores   (kind="scores")
          or  {"labels": [3, 1, ...]}            # N class indices          (kind="labels")

and the Open Inference Protocol v2 (``protocol="v2"``: KServe, Triton, advx's guard), posted to
``{url}/v2/models/{model_name}/infer``:

    request:  {"inputs": [{"name": "input", "shape": [N, C, H, W], "datatype": "FP32",
                           "data": [...]}]}      # the batch flattened in row-major order
    response: {"outputs": [{"name": ..., "shape": [N, K], "datatype": ..., "data": [...]}]}

the first output (or the one named by ``output_name``) holds scores (N, C) or labels (N,).

Timeouts and connection errors are retried with exponential backoff; a server error (5xx) too.
A rate limit (429) or an overloaded server (503) is retried after the wait its ``Retry-After``
header asks for (seconds or an HTTP date; at most ``max_retry_after``), each wait counted against
``retries``. Any other client error (4xx), malformed JSON or a wrong shape stop the attack with a
ModelError that says what came back. Every input sent is a query, charged to its sample once,
however many times the batch had to be sent.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, ModelError

__all__ = ["http_fn", "onnx_fn", "parse_headers", "retry_after_seconds"]

log = logging.getLogger("advx.models.remote")

PROTOCOLS = ("advx", "v2")
# RFC 9110 field names are tokens; values may not hold line breaks (header injection)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_V2_FLOAT = {"FP16", "FP32", "FP64", "BF16"}
_V2_INT = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"}


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds (>= 0): a number of seconds or an
    HTTP date; ``None`` when absent or unreadable (the caller then backs off on its own)."""
    if value is None:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(secs):
        return None
    return max(0.0, secs)


def parse_headers(items: Iterable[str], *, name: str = "--header") -> dict[str, str]:
    """``["K: V", "K2:V2"]`` (the CLI's repeatable ``--header``) as a dict; a malformed item is
    an InputError naming it."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition(":")
        if not sep or not key.strip():
            raise InputError(
                f"{name}: expected NAME:VALUE such as 'X-Api-Key: abc', got {str(item)[:80]!r}"
            )
        out[key.strip()] = value.strip()
    return _check_headers(out, name=name)


def _check_headers(headers: Mapping[str, str] | None, *, name: str = "headers") -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InputError(f"{name}: expected a dict of header names to values, got {headers!r}")
    out: dict[str, str] = {}
    for k, v in headers.items():
        if not isinstance(k, str) or not _HEADER_NAME.fullmatch(k):
            raise InputError(f"{name}: {str(k)[:60]!r} is not a valid HTTP header name")
        if not isinstance(v, str) or "\r" in v or "\n" in v:
            raise InputError(
                f"{name}: the value of {k!r} must be a string without line breaks, "
                f"got {type(v).__name__}"
            )
        out[k] = v
    return out


def _bearer(token_env: str) -> str:
    if not isinstance(token_env, str) or not token_env:
        raise InputError(f"token_env: expected an environment variable's name, got {token_env!r}")
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise InputError(
            f"token_env: the environment variable {token_env} is not set (or empty); "
            f"export {token_env}=<your API token> or pass the header yourself"
        )
    return f"Bearer {token}"


def _v2_endpoint(url: str, model_name: str | None) -> str:
    base = url.rstrip("/")
    if base.endswith("/infer"):
        return base
    if "/v2/models/" in base:
        return base + "/infer"
    if not isinstance(model_name, str) or not model_name.strip():
        raise InputError(
            "model_name: protocol='v2' needs the served model's name (it is part of the URL "
            f"{base}/v2/models/NAME/infer), got {model_name!r}"
        )
    return f"{base}/v2/models/{quote(model_name.strip(), safe='')}/infer"


def http_fn(
    url: str,
    *,
    kind: str = "scores",
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    headers: Mapping[str, str] | None = None,
    token_env: str | None = None,
    protocol: str = "advx",
    model_name: str | None = None,
    input_name: str = "input",
    output_name: str | None = None,
    max_retry_after: float = 60.0,
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
    if not isinstance(max_retry_after, (int, float)) or not max_retry_after >= 0:
        raise InputError(f"max_retry_after: expected seconds >= 0, got {max_retry_after!r}")
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not isinstance(input_name, str) or not input_name:
        raise InputError(f"input_name: expected the model input's name, got {input_name!r}")
    hdrs = _check_headers(headers)
    if token_env is not None:
        if any(k.lower() == "authorization" for k in hdrs):
            raise InputError(
                "token_env: headers already hold an Authorization header; give one or the other"
            )
        hdrs["Authorization"] = _bearer(token_env)
    endpoint = _v2_endpoint(str(url), model_name) if protocol == "v2" else str(url)
    client = httpx.Client(timeout=timeout, headers=hdrs)
    key = "scores" if kind == "scores" else "labels"

    def body_of(x: Tensor) -> dict[str, Any]:
        x = x.detach().to("cpu", torch.float32)
        if protocol == "advx":
            return {"inputs": x.tolist()}
        doc: dict[str, Any] = {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),  # (N, *shape) -> (N*prod(shape),)
                }
            ]
        }
        if output_name is not None:
            doc["outputs"] = [{"name": output_name}]
        return doc

    def read(doc: Any, n: int) -> Any:
        if protocol == "advx":
            if not isinstance(doc, dict) or key not in doc:
                raise ModelError(
                    f"{endpoint} answered JSON without a {key!r} field: {str(doc)[:200]!r}"
                )
            out = doc[key]
            if isinstance(out, list) and any(v is None for v in out):
                raise ModelError(_unanswered(endpoint, key, out, doc.get("decisions")))
            return out
        return _v2_output(doc, endpoint=endpoint, output_name=output_name, kind=kind, n=n)

    def fn(x: Tensor) -> Any:
        body = body_of(x)
        last: str = ""
        wait: float | None = None  # what the server asked for, before the next attempt
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1) if wait is None else wait)
            wait = None
            try:
                resp = client.post(endpoint, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {timeout:g}s"
                continue
            except httpx.TransportError as e:
                last = f"cannot connect ({type(e).__name__}: {e})"
                continue
            if resp.status_code in (429, 503):
                asked = retry_after_seconds(resp.headers.get("retry-after"))
                what = "rate limited (429)" if resp.status_code == 429 else "unavailable (503)"
                last = f"{what}: {resp.text[:200]!r}"
                if asked is not None:
                    wait = min(asked, float(max_retry_after))
                    last += f"; it asked to wait {asked:g}s (Retry-After)"
                if attempt < retries:
                    log.info(
                        "%s %s; retrying in %.3gs",
                        endpoint,
                        what,
                        wait if wait is not None else backoff * 2**attempt,
                    )
                continue
            if resp.status_code >= 500:
                last = f"server error {resp.status_code}: {resp.text[:200]!r}"
                continue
            if resp.status_code >= 400:
                raise ModelError(
                    f"{endpoint} refused the request: {resp.status_code} {resp.text[:200]!r}"
                )
            try:
                doc = resp.json()
            except ValueError:
                raise ModelError(
                    f"{endpoint} answered malformed JSON: {resp.text[:200]!r}"
                ) from None
            return read(doc, x.shape[0])
        raise ModelError(f"{endpoint} failed after {retries + 1} attempt(s): {last}")

    fn.__name__ = f"http:{endpoint}"
    fn.client = client  # type: ignore[attr-defined]
    return fn


def _unanswered(endpoint: str, key: str, out: list, decisions: Any) -> str:
    """Why a server (an ``advx serve`` guard) gave no answer for some inputs: the reasons it
    stated, so the caller sees "query attack suspected" rather than a malformed array."""
    rows = [i for i, v in enumerate(out) if v is None]
    why: list[str] = []
    if isinstance(decisions, list):
        for i in rows:
            d = decisions[i] if i < len(decisions) else None
            if isinstance(d, dict):
                why += [str(r) for r in d.get("reasons") or () if str(r) not in why]
    stated = f" (it said: {'; '.join(why[:3])})" if why else ""
    return (
        f"{endpoint} answered no {key[:-1]} for {len(rows)} of {len(out)} inputs{stated}: the "
        "server refused them; an advx serve guard rejects what it flags as a query attack "
        "(start it with --detect-queries off to attack it, or expect the refusal)"
    )


def _v2_output(doc: Any, *, endpoint: str, output_name: str | None, kind: str, n: int) -> Any:
    """The scores (N, C) or labels (N,) in a v2 inference response."""
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if (
        not isinstance(outputs, list)
        or not outputs
        or not all(isinstance(o, dict) for o in outputs)
    ):
        raise ModelError(f"{endpoint} answered no v2 'outputs' list of tensors: {str(doc)[:200]!r}")
    if output_name is None:
        out = outputs[0]
    else:
        found = [o for o in outputs if o.get("name") == output_name]
        if not found:
            names = ", ".join(repr(o.get("name")) for o in outputs)
            raise ModelError(f"{endpoint} answered no output {output_name!r} (it has {names})")
        out = found[0]
    name, dtype, shape = out.get("name"), out.get("datatype"), out.get("shape")
    if "data" not in out:
        raise ModelError(
            f"{endpoint}: output {name!r} has no JSON 'data' (binary tensor data is not read)"
        )
    if dtype not in _V2_FLOAT and dtype not in _V2_INT:
        raise ModelError(
            f"{endpoint}: output {name!r} has datatype {dtype!r}; advx reads numeric tensors"
        )
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and s >= 0 for s in shape)
    ):
        raise ModelError(f"{endpoint}: output {name!r} has shape {shape!r}")
    try:
        arr: np.ndarray = np.asarray(
            out["data"], dtype=np.float64 if dtype in _V2_FLOAT else np.int64
        )
        arr = arr.reshape(shape)  # the data is row-major, flat or nested
    except (TypeError, ValueError) as e:
        raise ModelError(
            f"{endpoint}: output {name!r} data does not fit its shape {shape}: {e}"
        ) from None
    dims: tuple[int, ...] = tuple(arr.shape)
    if not dims or dims[0] != n:
        raise ModelError(
            f"{endpoint}: output {name!r} has shape {shape} for {n} inputs; expected [{n}, ...]"
        )
    if kind == "labels" and len(dims) == 2 and dims[1] > 1:
        return arr.argmax(axis=1)  # the model returns scores; only the labels are disclosed
    return arr


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
