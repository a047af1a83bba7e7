"""The white-box model: a PyTorch module that returns logits, and the input space it lives in."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._memory import rows_that_fit
from .._state import evaluating
from .._validate import check_bounds, check_images, check_int
from ..errors import InputError
from ._base import Access, Model, ModelView, Tracker

__all__ = ["Classifier", "as_model"]

log = logging.getLogger("advx")

OutputSpec = str | int | Callable[[Any], Tensor] | None
# Candidate chunk sizes for the CPU's batch-size tuner: small chunks keep activations in cache.
_CPU_SIZES = (16, 32, 64, 128, 256, 512, 1024)
_TUNE_PASS_S = 0.2
# On a GPU a pass is one chunk up to this share of the memory free when the first pass of a
# shape ran (a kernel launch costs the same for 100 rows or 10,000: issue 15), at least
# _GPU_MIN_ROWS rows.
_GPU_CHUNK_SHARE = 0.5
_GPU_MIN_ROWS = 64
_GPU_PROBE_ROWS = 256


class Classifier(Model):
    """A PyTorch classifier and its input space.

    Args:
        net: any ``nn.Module`` that maps a batch of inputs to logits. It is never moved or
            modified: it is put in eval mode for the duration of a call and restored after.
        bounds: the range of valid inputs (before normalization), usually (0, 1).
        mean, std: per-channel normalization applied inside, so that attacks work in input space.
        output: how to get logits from what ``net`` returns: ``None`` (a tensor, an object with
            ``.logits``, or a dict with a ``"logits"`` key), a dict key, a tuple index, or a
            callable.
        num_classes: the number of classes (read from the first output when not given).
        budget: a per-sample limit on forward passes within one attack call.
        batch_size: rows per pass; ``"auto"``: on a CPU the fastest chunk size, measured once
            per dtype, input shape and size of batch (to the next power of two); on a GPU one
            chunk, up to as many rows as fit in half the memory free at the first pass of an
            input shape (measured: a probe pass's peak memory per row).
        autocast: run the net under ``torch.autocast`` with this dtype (``torch.bfloat16`` or
            ``torch.float16``, on a GPU); losses and gradients stay in the input's dtype.
        compile: run the forward-only passes (scores, labels: what score- and decision-based
            attacks spend) through ``torch.compile`` -- True, or a dict of its keyword
            arguments such as ``{"mode": "max-autotune"}``. The compiled wrapper shares the
            net's weights and leaves the net as it was; its output for each new input shape is
            checked once against the eager net (on a mismatch it is dropped with a warning).
            Gradient passes stay eager: with torch 2.13's inductor on a CPU (one thread), the input
            gradients of a compiled net came out all zero once it had been recompiled for a
            second batch size, and an attack fed zero gradients silently reports robustness
            that is not there. The first passes pay for the compilation (tens of seconds; on a
            CPU it needs a C++ compiler).
    """

    access: Access = "gradients"
    autograd = True
    # local arithmetic, row by row: done rows may ride along in an attack's passes (Model)
    paddable = True

    def __init__(
        self,
        net: nn.Module,
        *,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
        output: OutputSpec = None,
        num_classes: int | None = None,
        budget: int | None = None,
        batch_size: int | str = "auto",
        autocast: torch.dtype | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        if isinstance(net, Classifier):
            raise InputError("net: already a Classifier; pass it directly to the attack")
        if not isinstance(net, nn.Module):
            raise InputError(
                f"net: expected a torch.nn.Module returning logits, got {type(net).__name__}; "
                "wrap a plain function with advx.BlackBox"
            )
        self.net = net
        self.bounds = check_bounds(bounds)
        self._mean = _channel_stat("mean", mean)
        self._std = _channel_stat("std", std)
        if self._std is not None and bool((self._std <= 0).any()):
            raise InputError("std: every entry must be > 0")
        if self._mean is not None and self._std is None:
            self._std = torch.ones_like(self._mean)  # mean without std: subtract only
        if self._std is not None and self._mean is None:
            self._mean = torch.zeros_like(self._std)
        self.output = output
        self.num_classes = check_int(num_classes, name="num_classes", low=2, allow_none=True)
        self.budget = check_int(
            budget, name="budget", allow_none=True, hint="forward passes per sample"
        )
        if batch_size != "auto":
            check_int(batch_size, name="batch_size", hint="or 'auto'")
        self.batch_size = batch_size
        if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
            raise InputError(
                f"autocast: expected torch.bfloat16, torch.float16 or None, got {autocast!r}"
            )
        self.autocast = autocast
        if not isinstance(compile, (bool, dict)):
            raise InputError(
                f"compile: expected True, False or a dict of torch.compile options, got {compile!r}"
            )
        self.compile = compile
        self._compiled: Callable[[Tensor], Any] | None = None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        self._stats: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._tuned: dict[tuple, int] = {}
        self._depth = 0
        self._warned_train = False
        self._checked_output = False

    def __repr__(self) -> str:
        norm = ""
        if self._mean is not None and self._std is not None:
            norm = f", mean={self._mean.tolist()}, std={self._std.tolist()}"
        return f"Classifier({type(self.net).__name__}, bounds={self.bounds}{norm})"

    # ---- public, for users ------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        """Logits for a batch of inputs in input space (validated, eval mode, no grad)."""
        x = check_images(x, self.bounds, name="x")
        self.check_input(x)
        with self.prepared(), torch.no_grad():
            view = ModelView(self, Tracker(x.shape[0], x.device))
            return view.logits(x)

    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels, shape (N,)."""
        return self(x).argmax(dim=1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y.to(x.device)).float().mean())

    def as_blackbox(self, kind: Access = "scores", *, budget: int | None = None) -> Model:
        """This classifier seen as a black box that answers ``"scores"`` or only ``"labels"``.

        Attacks see no gradients through it: for testing black-box attacks on a known model.
        """
        from .blackbox import ClassifierBox

        if kind not in ("scores", "labels"):
            raise InputError(f"kind: expected 'scores' or 'labels', got {kind!r}")
        return ClassifierBox(self, kind, budget=self.budget if budget is None else budget)

    @property
    def device(self) -> torch.device:
        for p in self.net.parameters():
            return p.device
        return torch.device("cpu")

    # ---- Model interface --------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        p = next(self.net.parameters(), None)
        if p is not None and p.device != x.device:
            raise InputError(
                f"x is on {x.device} but the model's parameters are on {p.device}; "
                f"move the inputs with x.to('{p.device}') (advx never moves your model)"
            )

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Eval mode for the duration; every submodule's mode restored after, even on error."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        if any(m.training for m in self.net.modules()) and not self._warned_train:
            self._warned_train = True
            warnings.warn(
                "the model was in training mode; advx evaluates it in eval mode (dropout off, "
                "batch-norm statistics frozen) and puts the mode back afterwards",
                UserWarning,
                stacklevel=4,
            )
        self._depth = 1
        try:
            with evaluating(self.net):
                yield
        finally:
            self._depth = 0

    # ---- the input space and the output, for wrappers and training ---------------------------
    @property
    def mean(self) -> Tensor | None:
        """Per-channel mean subtracted inside (float64, (C,)), or None."""
        return self._mean

    @property
    def std(self) -> Tensor | None:
        """Per-channel std divided by inside (float64, (C,)), or None."""
        return self._std

    def modules(self) -> list[nn.Module]:
        return [self.net]

    def preprocess(self, x: Tensor) -> Tensor:
        """Inputs in input space -> what the net takes (normalized with mean/std)."""
        if self._mean is None:
            return x
        key = (x.device, x.dtype)
        if key not in self._stats:
            assert self._std is not None  # set together with the mean in __init__
            shape = (1, -1) + (1,) * (x.dim() - 2)  # (C,) -> (1, C, 1, 1)
            self._stats[key] = (
                self._mean.to(x.device, x.dtype).view(shape),
                self._std.to(x.device, x.dtype).view(shape),
            )
            if self._mean.numel() not in (1, x.shape[1]):
                raise InputError(
                    f"mean/std: {self._mean.numel()} values but x has {x.shape[1]} channels "
                    "in dimension 1"
                )
        mean, std = self._stats[key]
        return (x - mean) / std

    def logits_of(self, out: Any) -> Tensor:
        """The logits (N, C) in what the net returned (per ``output=``)."""
        spec = self.output
        if spec is None:
            if isinstance(out, Tensor):
                logits = out
            elif hasattr(out, "logits"):
                logits = out.logits
            elif isinstance(out, dict) and "logits" in out:
                logits = out["logits"]
            else:
                raise InputError(
                    f"the model returned a {type(out).__name__}, not a tensor of logits; tell "
                    "the Classifier where they are with output= (a dict key, a tuple index or a "
                    "callable)"
                )
        elif callable(spec):
            logits = spec(out)
        else:
            try:
                logits = out[spec]
            except (KeyError, IndexError, TypeError):
                raise InputError(
                    f"output={spec!r}: the model's output {type(out).__name__} has no such entry"
                ) from None
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise InputError(f"expected logits of shape (N, classes) from the model, got {shape}")
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """Logits for inputs in input space: normalized, through the net, adapted; an autograd
        graph with respect to x when grad is on. Not validated, not counted."""
        p = next(self.net.parameters(), None)
        xin = x if p is None or p.dtype == x.dtype or not p.is_floating_point() else x.to(p.dtype)
        xin = self.preprocess(xin)
        out = self._run_net(xin, compiled=bool(self.compile) and not torch.is_grad_enabled())
        logits = self.logits_of(out)
        if logits.dtype != x.dtype:
            logits = logits.to(x.dtype)  # losses in the caller's precision
        if not self._checked_output:
            self._check_output(logits)
        return logits

    def _run_net(self, xin: Tensor, *, compiled: bool) -> Any:
        net = self._compiled_net(xin) if compiled else self.net
        if self.autocast is not None:
            with torch.autocast(device_type=xin.device.type, dtype=self.autocast):
                return net(xin)
        return net(xin)

    def _compiled_net(self, xin: Tensor) -> Callable[[Tensor], Any]:
        """The compiled wrapper (built on the first pass), once its output for this input
        shape has matched the eager net's; the eager net when compiling is off or failed."""
        if not self.compile:
            return self.net
        if self._compiled is None:
            options = self.compile if isinstance(self.compile, dict) else {}
            try:
                self._compiled = torch.compile(self.net, **options)
            except TypeError as e:
                raise InputError(
                    f"compile: torch.compile does not take these options: {e}"
                ) from None
        shape = tuple(xin.shape)
        if shape not in self._compiled_shapes:
            fast, slow = self.logits_of(self._compiled(xin)), self.logits_of(self.net(xin))
            scale = float(slow.abs().max()) if slow.numel() else 0.0
            if fast.shape != slow.shape or not bool(
                torch.allclose(fast.float(), slow.float(), rtol=1e-3, atol=1e-3 * max(1.0, scale))
            ):
                warnings.warn(
                    "compile: the compiled model's output differs from the eager model's; "
                    "advx runs it eagerly from now on",
                    UserWarning,
                    stacklevel=2,
                )
                self.compile = False
                return self.net
            self._compiled_shapes.add(shape)
        return self._compiled

    def _check_output(self, logits: Tensor) -> None:
        self._checked_output = True
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        elif logits.shape[1] != self.num_classes:
            raise InputError(
                f"num_classes={self.num_classes} but the model returns {logits.shape[1]} scores"
            )
        with torch.no_grad():
            sums = logits.detach().sum(dim=1)
            if (
                logits.shape[0]
                and bool((logits >= 0).all())
                and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
            ):
                warnings.warn(
                    "the model seems to return probabilities (rows are >= 0 and sum to 1); attacks "
                    "and their losses expect logits and are weaker on probabilities (softmax "
                    "saturates the gradients) -- return the logits, or pass output= to pick them",
                    UserWarning,
                    stacklevel=6,
                )

    # ---- chunk size -------------------------------------------------------------------------
    def batch_size_for(self, x: Tensor, *, grad: bool) -> int:
        if self.batch_size != "auto":
            return int(self.batch_size)
        if x.device.type == "cuda":
            return self._gpu_rows(x, grad)
        n = x.shape[0]
        if n <= 64:
            return max(1, n)  # too few rows for the tuning to pay off
        # Sizes are measured per bucket of batch sizes (the next power of two), never capped at
        # the first batch seen: a later, larger batch may run fastest in larger chunks.
        bucket = 1 << (n - 1).bit_length()
        shape = (x.device.type, x.device.index, x.dtype, tuple(x.shape[1:]), grad)
        size = self._tuned.get(shape + (bucket,))
        if size is None:
            # a larger bucket's measurement covers this one's sizes: its choice when this bucket
            # allows it, else the largest chunk this bucket has (it wanted larger ones)
            larger = [b for k, b in self._tuned.items() if k[:-1] == shape and k[-1] > bucket]
            if larger:
                return min(min(larger), bucket)
            size = self._tune(x, grad, bucket)
            self._tuned[shape + (bucket,)] = size
        return size

    def _gpu_rows(self, x: Tensor, grad: bool) -> int:
        """Rows per pass on a GPU: as many as fit in a share of the memory free at the first
        pass of this shape (measured: the peak memory of a probe pass, per row), kept."""
        key = ("cuda", x.device.index, x.dtype, tuple(x.shape[1:]), grad)
        rows = self._tuned.get(key)
        if rows is None:
            rows = rows_that_fit(
                x.device,
                self._row_bytes(x, grad),
                share=_GPU_CHUNK_SHARE,
                at_least=_GPU_MIN_ROWS,
                at_most=1 << 24,
            )
            self._tuned[key] = rows
            log.debug("chunk size %d for %s on %s (%s)", rows, key[3], x.device, key[4])
        return rows

    def _row_bytes(self, x: Tensor, grad: bool) -> int:
        """Peak GPU memory of one pass per row, from a pass over the first rows of ``x``. Once
        per input shape; it resets the device's peak-memory statistic (torch has no other way
        to measure a peak), which a caller profiling memory around the first pass will see."""
        rows = x[:_GPU_PROBE_ROWS]
        dev = x.device
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self._probe(rows, grad)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        return max(1, -(-peak // rows.shape[0]))

    def _probe(self, rows: Tensor, grad: bool) -> None:
        """One pass over ``rows`` as an attack runs it: forward, and backward to the input."""
        if grad:
            xg = rows.detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.grad(self.forward(xg).logsumexp(dim=1).sum(), xg)
        else:
            with torch.no_grad():
                self.forward(rows)

    def _tune(self, x: Tensor, grad: bool, bucket: int) -> int:
        """Measure time per row at a few chunk sizes and keep the fastest (smallest on ties).

        Cheap by design: no chunk larger than the batch's ``bucket`` (at least 64), no size
        beyond the first whose single pass takes over ``_TUNE_PASS_S`` -- by then the fixed cost
        of a pass, which is what bigger chunks save, is a rounding error (on a ResNet-20 the
        full sweep cost some 25 s of CPU, more than the attacks it tuned)."""
        n = x.shape[0]
        sizes = [b for b in _CPU_SIZES if b <= max(64, bucket)] or [_CPU_SIZES[0]]

        def timed(b: int) -> float:
            t0 = time.perf_counter()
            self._probe(x[torch.arange(b, device=x.device) % n], grad)
            return time.perf_counter() - t0

        per_row: dict[int, float] = {}
        worse = 0
        for b in sizes:
            first = timed(b)  # also the warm-up: allocator, kernels
            if first > _TUNE_PASS_S:
                per_row[b] = first / b
                break
            per_row[b] = min(timed(b), timed(b)) / b
            fastest = min(per_row.values())
            worse = worse + 1 if per_row[b] > 1.15 * fastest else 0
            if worse >= 2:
                break
        fastest = min(per_row.values())
        choice = min(b for b, t in per_row.items() if t <= 1.05 * fastest)
        if choice >= n:
            choice = bucket  # one chunk for every batch of the bucket
        log.debug(
            "chunk size %d for %s (%s), per-row times %s",
            choice,
            tuple(x.shape[1:]),
            "forward+backward" if grad else "forward",
            per_row,
        )
        return choice


def _channel_stat(name: str, value) -> Tensor | None:
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).flatten()
    except (TypeError, ValueError):
        raise InputError(
            f"{name}: expected a sequence of per-channel numbers, got {value!r}"
        ) from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: expected finite per-channel numbers, got {value!r}")
    return t


def as_model(model: Any) -> Model:
    """Accept a Model as is; wrap a bare ``nn.Module`` in a Classifier with default settings."""
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        return Classifier(model)
    raise InputError(
        f"model: expected an advx.Classifier, a torch.nn.Module or an advx.BlackBox, got "
        f"{type(model).__name__}"
    )
