"""Where a result came from: one function that every report, checkpoint and result uses."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import torch

from ._version import __version__

__all__ = ["provenance", "versions", "now"]


def now() -> str:
    """The current time in UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """advx's, torch's and Python's versions."""
    return {
        "advx": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def provenance(
    *, device: torch.device | str | None = None, seed: int | None = None, **extra: Any
) -> dict[str, Any]:
    """Versions, platform, threads, and what the caller adds (seed, device, data hash, ...).

    Keys with a None value are left out, so callers can pass optional facts unconditionally.
    """
    out: dict[str, Any] = {
        **versions(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    if device is not None:
        out["device"] = str(device)
    if seed is not None:
        out["seed"] = seed
    out.update({k: v for k, v in extra.items() if v is not None})
    return out
