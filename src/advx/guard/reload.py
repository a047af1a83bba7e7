"""A running service picks up the promoted version of its model directory.

``advx serve --model-dir DIR`` serves ``DIR``'s current version; on SIGHUP or an authenticated
``POST /admin/reload`` it loads the version the ``current`` pointer names *beside* the one
serving (in a worker thread; requests keep being answered) and swaps the guard in between two
model passes: every batch is answered wholly by the old guard or wholly by the new one, and no
request is dropped. A version that fails to load -- damaged weights, a policy for other weights,
another input shape or number of classes -- is not swapped in: the old one keeps serving, and the
failure is logged, counted (``advx_model_reloads_total{outcome="failed"}``, and
``advx_model_reload_failed`` stays 1 until a reload succeeds) and returned to the caller with
its reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch

from .guard import Guard
from .versions import ModelDir

__all__ = ["ModelDirReloader"]

log = logging.getLogger("advx.guard.service")


class ModelDirReloader:
    """Loads the current version of ``model_dir`` as a :class:`Guard` (``fallback`` and
    ``guard_kw`` go to every guard built) and swaps it into a service."""

    def __init__(
        self,
        model_dir: str | os.PathLike | ModelDir,
        *,
        device: str | torch.device = "cpu",
        fallback: Any = None,
        **guard_kw: Any,
    ) -> None:
        self.model_dir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        self.device = device
        self.fallback = fallback
        self.guard_kw = guard_kw
        self._lock = threading.Lock()  # one reload at a time
        self._metrics: tuple[Any, Any] | None = None
        self.last: dict[str, Any] = {}

    def load(self, version: str | None = None) -> Guard:
        """The guard of ``version`` (default: the current one), loaded completely."""
        loaded = self.model_dir.load(version, device=self.device)
        return loaded.guard(fallback=self.fallback, **self.guard_kw)

    def attach(self, registry: Any) -> None:
        """Count reloads in a Prometheus ``registry`` (the service's)."""
        from prometheus_client import Counter, Gauge

        self._metrics = (
            Counter(
                "advx_model_reloads",
                "Reloads of the model directory's current version, by outcome",
                ["outcome"],
                registry=registry,
            ),
            Gauge(
                "advx_model_reload_failed",
                "1 when the last reload failed and an older version keeps serving",
                registry=registry,
            ),
        )

    def reload(self, service: Any) -> dict[str, Any]:
        """Serve the current version in ``service`` (anything with ``guard`` and
        ``swap_guard(guard)``). Never raises: the answer says what is served and, when the
        current version could not be, why."""
        with self._lock:
            t0 = time.perf_counter()
            previous = service.guard.version
            current: str | None = None
            try:
                current = self.model_dir.current()
                if current is None:
                    raise ValueError(f"{self.model_dir.root} has no current version")
                if current == previous:
                    return self._done(
                        "unchanged", ok=True, changed=False, version=previous, current=current
                    )
                service.swap_guard(self.load(current))
            except Exception as e:  # whatever failed, the old guard is still in place
                reason = str(e) or type(e).__name__
                log.error(
                    "reload failed; %s keeps serving: %s",
                    previous,
                    reason,
                    extra={"fields": {"version": previous, "current": current}},
                )
                return self._done(
                    "failed",
                    ok=False,
                    changed=False,
                    version=previous,
                    current=current,
                    reason=reason,
                )
            log.info(
                "reloaded: now serving %s (was %s)",
                current,
                previous,
                extra={"fields": {"version": current, "previous": previous}},
            )
            return self._done(
                "ok",
                ok=True,
                changed=True,
                version=current,
                previous=previous,
                current=current,
                seconds=round(time.perf_counter() - t0, 3),
            )

    def _done(self, outcome: str, **answer: Any) -> dict[str, Any]:
        if self._metrics is not None:
            count, failed = self._metrics
            count.labels(outcome).inc()
            failed.set(int(outcome == "failed"))
        self.last = dict(answer, outcome=outcome)
        return dict(answer)
