"""Restore what you touch: a user's module comes back in the mode and grad state it had.

One context manager for every "put the net in eval mode, then put it back" in advx: it records
the ``training`` flag of every submodule (not just the top one: a user may have frozen a
submodule in eval mode on purpose) and, on request, the global grad mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["evaluating", "training_modes", "restore_modes"]


def training_modes(modules: nn.Module | Iterable[nn.Module]) -> list[tuple[nn.Module, bool]]:
    """The ``training`` flag of every submodule of ``modules``."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    return [(m, m.training) for root in roots for m in root.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, t in modes:
        m.training = t


@contextlib.contextmanager
def evaluating(
    modules: nn.Module | Iterable[nn.Module], *, no_grad: bool = False
) -> Iterator[list[tuple[nn.Module, bool]]]:
    """Every module in eval mode for the duration (and under ``torch.no_grad`` when asked);
    every submodule's mode restored after, even on error. Yields the modes it found."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    modes = training_modes(roots)
    for root in roots:
        root.eval()
    try:
        if no_grad:
            with torch.no_grad():
                yield modes
        else:
            yield modes
    finally:
        restore_modes(modes)
