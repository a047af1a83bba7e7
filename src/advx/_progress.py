"""Progress bars (tqdm, imported lazily). Shown on an interactive terminal, silent otherwise;
``ADVX_PROGRESS=0`` turns them off and ``ADVX_PROGRESS=1`` forces them on.

Two shapes, one setting: :func:`progress` wraps an iterable; :func:`bar` is a bar advanced by
hand (an audit counts sample-stages, training counts batches). Inside :func:`quiet` neither
shows (an attack run as one step of a training epoch would only add noise).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["progress", "bar", "Bar", "quiet", "enabled"]

_QUIET = [0]  # > 0 inside quiet()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars for the duration (nested bars under an outer one are noise)."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def enabled() -> bool | None:
    """False: no bars; True: bars even on a pipe; None: tqdm decides (on for a terminal)."""
    if _QUIET[0]:
        return False
    value = os.environ.get("ADVX_PROGRESS", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def _tqdm(**kwargs: Any) -> Any | None:
    setting = enabled()
    if setting is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return None
    return tqdm(
        leave=kwargs.pop("leave", False),
        dynamic_ncols=True,
        disable=None if setting is None else False,
        **kwargs,
    )


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
) -> Iterator[T]:
    """``iterable`` with a progress bar."""
    if enabled() is False:
        return iter(iterable)
    t = _tqdm(iterable=iterable, total=total, desc=desc, unit=unit, leave=leave)
    return iter(iterable) if t is None else iter(t)


class Bar:
    """A bar advanced by hand. Every method is a no-op when bars are off."""

    def __init__(self, *, total: int, desc: str, unit: str = "it", initial: int = 0) -> None:
        self._bar = (
            None if total <= 0 else _tqdm(total=total, desc=desc, unit=unit, initial=initial)
        )

    def update(self, k: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(k)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text, refresh=False)

    def postfix(self, values: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, line: str) -> None:
        """A line above the bar (a finished epoch, say); nothing when bars are off."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(*, total: int, desc: str, unit: str = "it", initial: int = 0) -> Bar:
    """A :class:`Bar` (use it as a context manager so it closes on error)."""
    return Bar(total=total, desc=desc, unit=unit, initial=initial)
