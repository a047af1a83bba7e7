"""Progress bars (tqdm, imported lazily). Shown on an interactive terminal, silent otherwise;
``ADVX_PROGRESS=0`` turns them off and ``ADVX_PROGRESS=1`` forces them on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


_QUIET = [0]  # > 0 inside quiet(): no bars (e.g. an attack run as one step of a training epoch)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars for the duration (nested bars under an outer one are noise)."""
    _QUIET[0] += 1
    try:
        yield
    finally:
        _QUIET[0] -= 1


def _setting() -> bool | None:
    if _QUIET[0]:
        return False
    value = os.environ.get("ADVX_PROGRESS", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None  # tqdm decides: on for a terminal, off for a pipe or a log file


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
) -> Iterator[T]:
    setting = _setting()
    if setting is False:
        return iter(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return iter(iterable)
    return iter(
        tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            leave=leave,
            disable=None if setting is None else False,
            dynamic_ncols=True,
        )
    )
