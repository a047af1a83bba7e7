"""How much a GPU can still hold, and how many rows of a given size fit in a share of it.

On a GPU the overhead of a pass (its kernel launches) is paid per chunk, whatever its rows: a
pass should be one chunk, as large as memory allows, and an audit's unit of work as many
samples as fit. Sizes come from memory, measured, never from timing: the same bound on the same
device state gives the same chunks. A CPU has no such bound here (its chunks are tuned for its
caches, :meth:`~advx.models.Classifier.batch_size_for`).
"""

from __future__ import annotations

import torch

__all__ = ["free_bytes", "rows_that_fit"]


def free_bytes(device: torch.device) -> int:
    """Bytes a CUDA device can still give this process: the driver's free memory plus what
    torch's caching allocator holds without using it."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def rows_that_fit(
    device: torch.device, row_bytes: int, *, share: float, at_least: int = 1, at_most: int
) -> int:
    """How many rows of ``row_bytes`` each fit in ``share`` of what ``device`` has free,
    within [at_least, at_most]; ``at_most`` off a CUDA device."""
    if device.type != "cuda":
        return at_most
    fit = int(free_bytes(device) * share) // max(1, int(row_bytes))
    return max(at_least, min(at_most, fit))
