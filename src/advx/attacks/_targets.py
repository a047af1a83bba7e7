"""Choosing target classes for targeted attacks."""

from __future__ import annotations

import torch
from torch import Tensor

from .._rng import SampleRNG
from ..errors import InputError


def random_targets(
    y: Tensor, num_classes: int, *, seed: int = 0, index: Tensor | None = None
) -> Tensor:
    """A uniformly random class different from ``y`` for each sample, from its own stream."""
    if num_classes < 2:
        raise InputError(f"num_classes: need at least 2 classes for a target, got {num_classes}")
    index = torch.arange(y.numel(), device=y.device) if index is None else index
    shift = SampleRNG(seed, index).randint(0x7A26, high=num_classes - 1) + 1  # 1..C-1
    return (y + shift) % num_classes
