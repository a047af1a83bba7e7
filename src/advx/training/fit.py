"""One fit loop: no trainer framework, deterministic with a seed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._progress import progress
from ..errors import InputError

__all__ = ["fit", "History"]

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def standard(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Plain cross-entropy on clean inputs."""
    return F.cross_entropy(net(x), y)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def fit(net: nn.Module, x: Tensor, y: Tensor, *, loss: LossFn = standard, epochs: int = 1,
        batch_size: int = 128, lr: float = 1e-3, seed: int = 0, desc: str = "train") -> History:
    """Train ``net`` in place with Adam; the data order comes from ``seed`` alone."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InputError(f"fit: epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"fit: {x.shape[0]} inputs but {y.shape[0]} labels")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = History()
    start = time.perf_counter()
    was_training = net.training
    net.train()
    try:
        for epoch in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            total, correct, seen = 0.0, 0, 0
            batches = range(0, x.shape[0], batch_size)
            for b in progress(batches, total=len(batches), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch"):
                idx = order[b : b + batch_size]
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                value = loss(net, xb, yb)
                if not torch.isfinite(value):
                    raise FloatingPointError(f"fit: the loss became {float(value)} at epoch {epoch + 1}, batch {b // batch_size + 1}")
                value.backward()
                opt.step()
                total += float(value.detach()) * len(idx)
                seen += len(idx)
            history.epochs.append({"epoch": epoch + 1, "loss": total / max(1, seen)})
    finally:
        opt.zero_grad(set_to_none=True)  # leave no gradients on the weights
        net.train(was_training)
    history.seconds = time.perf_counter() - start
    return history
