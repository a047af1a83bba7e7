"""Black-box access: a model you can only query for scores, or only for labels.

``BlackBox(fn, kind="scores")`` wraps any callable that maps a batch of inputs (a tensor of
shape (N, ...)) to scores (N, C) or labels (N,), as a tensor, a NumPy array or a list. Every
query goes through the same per-sample accounting as a white-box model, no gradient is ever
asked for, and a misbehaving model (wrong shape, NaN, an exception) stops the attack with a
:class:`~advx.errors.ModelError` that says what went wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import import_object
from .._validate import check_bounds, check_int
from ..errors import InputError, ModelError
from ._base import Access, Model

__all__ = ["BlackBox"]


class BlackBox(Model):
    """A model known only through its answers.

    Args:
        fn: maps a batch (N, ...) in input space to scores (N, C) or labels (N,).
        kind: ``"scores"`` (score-based attacks can use it) or ``"labels"`` (decision-based only).
        bounds: the range of valid inputs.
        batch_size: the most inputs per call of ``fn`` (None: all at once).
        budget: a per-sample limit on queries within one attack call.
        num_classes: the number of classes (read from the first scores when not given; needed
            for label-only models when the attack must check label ranges).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Any],
        *,
        kind: Access = "scores",
        bounds: tuple[float, float] = (0.0, 1.0),
        batch_size: int | None = None,
        budget: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not callable(fn):
            raise InputError(
                "fn: expected a callable that maps a batch of inputs to scores or labels, "
                f"got {type(fn).__name__}"
            )
        if kind not in ("scores", "labels"):
            raise InputError(f"kind: expected 'scores' or 'labels', got {kind!r}")
        check_int(batch_size, name="batch_size", allow_none=True)
        check_int(budget, name="budget", allow_none=True, hint="queries per sample")
        check_int(num_classes, name="num_classes", low=2, allow_none=True)
        self.fn = fn
        self.access = kind
        self.bounds = check_bounds(bounds)
        self.batch_size = batch_size
        self.budget = budget
        self.num_classes = num_classes

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"BlackBox({name}, kind={self.access!r}, bounds={self.bounds})"

    @classmethod
    def from_http(
        cls,
        url: str,
        *,
        kind: Access = "scores",
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        headers: dict[str, str] | None = None,
        token_env: str | None = None,
        protocol: str = "advx",
        model_name: str | None = None,
        input_name: str = "input",
        output_name: str | None = None,
        max_retry_after: float = 60.0,
        batch_size: int | None = 64,
        **kwargs: Any,
    ) -> BlackBox:
        """A model behind an HTTP endpoint (see :mod:`advx.models.remote`): timeouts, retries
        with exponential backoff, 429/503 retried after the server's ``Retry-After`` (at most
        ``max_retry_after`` seconds), and a clear error when the server misbehaves.

        ``protocol="advx"`` posts ``{"inputs": [...]}`` to ``url``; ``protocol="v2"`` speaks the
        Open Inference Protocol (KServe, Triton, advx's guard) to
        ``{url}/v2/models/{model_name}/infer``, sending one FP32 tensor named ``input_name`` and
        reading the first output (or ``output_name``). ``headers`` go with every request;
        ``token_env`` names an environment variable whose value is sent as
        ``Authorization: Bearer <value>`` (read now; the token never appears in messages)."""
        from .remote import http_fn

        fn = http_fn(
            url,
            kind=kind,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            headers=headers,
            token_env=token_env,
            protocol=protocol,
            model_name=model_name,
            input_name=input_name,
            output_name=output_name,
            max_retry_after=max_retry_after,
        )
        return cls(fn, kind=kind, batch_size=batch_size, **kwargs)

    @classmethod
    def from_onnx(
        cls,
        path,
        *,
        kind: Access = "scores",
        output: int = 0,
        providers: list[str] | None = None,
        **kwargs: Any,
    ) -> BlackBox:
        """An ONNX model run by onnxruntime; with ``kind="labels"`` only its argmax is disclosed."""
        from .remote import onnx_fn

        return cls(
            onnx_fn(path, kind=kind, output=output, providers=providers), kind=kind, **kwargs
        )

    @classmethod
    def from_spec(
        cls,
        spec: str,
        *,
        headers: dict[str, str] | None = None,
        token_env: str | None = None,
        protocol: str = "advx",
        model_name: str | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        **kwargs: Any,
    ) -> BlackBox:
        """``http(s)://...``, ``path/to/model.onnx`` or ``pkg.module:fn`` (a callable, or a
        factory of one when called with no arguments returns a callable).

        ``headers``, ``token_env``, ``protocol``, ``model_name``, ``input_name`` and
        ``output_name`` are the HTTP options of :meth:`from_http` (the CLI's ``--header``,
        ``--token-env``, ``--protocol``, ``--model-name``, ``--input-name``, ``--output-name``;
        None: the default); given with a spec that is not a URL they are refused rather than
        ignored."""
        spec = str(spec)
        if spec.startswith(("http://", "https://")):
            return cls.from_http(
                spec,
                headers=headers,
                token_env=token_env,
                protocol=protocol,
                model_name=model_name,
                input_name="input" if input_name is None else input_name,
                output_name=output_name,
                **kwargs,
            )
        http: dict[str, Any] = {
            "headers": headers,
            "token_env": token_env,
            "protocol": protocol,
            "model_name": model_name,
            "input_name": input_name,
            "output_name": output_name,
        }
        given = [
            k for k, v in http.items() if (v not in (None, {}) if k != "protocol" else v != "advx")
        ]
        if given:
            raise InputError(
                f"{', '.join(given)}: only for a black box behind HTTP; {spec!r} is not an "
                "http:// or https:// URL"
            )
        if spec.endswith(".onnx"):
            return cls.from_onnx(spec, **kwargs)
        fn = import_object(spec, name="model")
        return cls(fn, **kwargs)

    def batch_size_for(self, x: Tensor, *, grad: bool) -> int:
        return self.batch_size or max(1, x.shape[0])

    def _call(self, x: Tensor) -> Tensor:
        try:
            out = self.fn(x.detach())
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"the black box raised {type(e).__name__}: {e}") from e
        if isinstance(out, Tensor):
            out = out.detach()
        else:
            try:
                out = torch.as_tensor(np.asarray(out))
            except (TypeError, ValueError) as e:
                raise ModelError(
                    f"the black box returned {type(out).__name__}, which is not an array ({e})"
                ) from None
        return out.to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.access == "labels":
            raise ModelError("this black box returns labels only")
        out = self._call(x)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ModelError(
                f"the black box returned shape {tuple(out.shape)} for {x.shape[0]} inputs; "
                f"expected ({x.shape[0]}, classes) scores"
            )
        if not torch.is_floating_point(out):
            out = out.to(x.dtype)
        if not bool(torch.isfinite(out).all()):
            raise ModelError("the black box returned NaN or Inf scores")
        if self.num_classes is None:
            self.num_classes = out.shape[1]
        elif out.shape[1] != self.num_classes:
            raise ModelError(
                f"the black box returned {out.shape[1]} scores per input; "
                f"expected {self.num_classes}"
            )
        return out.to(x.dtype)

    def labels(self, x: Tensor) -> Tensor:
        if self.access == "scores":
            return self.forward(x).argmax(dim=1)
        out = self._call(x)
        if out.dim() == 2 and out.shape[1] == 1:
            out = out.view(-1)
        if out.dim() != 1 or out.shape[0] != x.shape[0]:
            raise ModelError(
                f"the black box returned shape {tuple(out.shape)} for {x.shape[0]} inputs; "
                f"expected ({x.shape[0]},) labels"
            )
        if torch.is_floating_point(out):
            if not bool(torch.isfinite(out).all()) or not bool((out == out.round()).all()):
                raise ModelError("the black box returned labels that are not whole numbers")
        out = out.long()
        if out.numel() and (
            int(out.min()) < 0
            or (self.num_classes is not None and int(out.max()) >= self.num_classes)
        ):
            raise ModelError(
                f"the black box returned labels outside [0, {(self.num_classes or 0) - 1}]"
            )
        return out


class ClassifierBox(BlackBox):
    """A white-box Classifier seen as a black box (for testing black-box attacks)."""

    def __init__(self, classifier, kind: Access, budget: int | None = None) -> None:
        def fn(x: Tensor) -> Tensor:
            with torch.no_grad():
                z = classifier.forward(x)
            return z if kind == "scores" else z.argmax(dim=1)

        super().__init__(
            fn,
            kind=kind,
            bounds=classifier.bounds,
            budget=budget,
            num_classes=classifier.num_classes,
        )
        self.classifier = classifier

    def __repr__(self) -> str:
        return f"{self.classifier!r}.as_blackbox({self.access!r})"

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        with self.classifier.prepared():
            if self.num_classes is None and self.classifier.num_classes is not None:
                self.num_classes = self.classifier.num_classes
            yield

    def batch_size_for(self, x: Tensor, *, grad: bool) -> int:
        return self.classifier.batch_size_for(x, grad=False)

    def check_input(self, x: Tensor) -> None:
        self.classifier.check_input(x)
