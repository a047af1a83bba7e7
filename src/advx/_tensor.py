"""Small tensor helpers shared by the threat models and the attacks."""

from __future__ import annotations

import torch
from torch import Tensor


def flat(x: Tensor) -> Tensor:
    """(N, ...) -> (N, D) without copying when possible."""
    return x.reshape(x.shape[0], -1)


def per_sample(v: Tensor | float, like: Tensor) -> Tensor | float:
    """Broadcast a scalar or a per-sample (N,) value against a batch ``like`` of shape (N, ...)."""
    if isinstance(v, Tensor) and v.dim() > 0:
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))  # (N,) -> (N, 1, ..., 1)
    return float(v)


def as_index(idx: Tensor | slice | None, n: int, device: torch.device) -> Tensor:
    """A selection (bool mask, integer indices or None for all) as int64 indices."""
    if idx is None:
        return torch.arange(n, device=device)
    if isinstance(idx, Tensor) and idx.dtype == torch.bool:
        return idx.nonzero().view(-1)
    return torch.as_tensor(idx, device=device, dtype=torch.long).view(-1)
