"""Per-row input validation: each row is checked on its own, and a bad one becomes a reason.

Rows arrive as tensors, numpy arrays or nested lists decoded from JSON; a row can have the
wrong shape, hold a string, a NaN or an infinity, or lie outside the model's bounds. None of
those may fail the batch: :func:`check_rows` returns the good rows stacked and, for each bad
row, why it was refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_rows", "MAX_ROWS"]

# A single request may not carry more rows than this (the service refuses larger bodies before
# reading them; this is the library's own limit for a direct call).
MAX_ROWS = 4096


def _row_array(row: Any) -> tuple[np.ndarray | None, str]:
    if isinstance(row, Tensor):
        row = row.detach().to("cpu")
        if row.dtype.is_complex or row.dtype == torch.bool:
            return None, f"dtype {row.dtype} is not a real number type"
        return row.to(torch.float64).numpy(), ""
    try:
        arr = np.asarray(row)
    except (ValueError, TypeError) as e:  # ragged nesting
        return None, f"not a rectangular array ({str(e).splitlines()[0][:80]})"
    if arr.dtype == object:
        return None, "not a rectangular array of numbers (ragged or mixed nesting)"
    if arr.dtype.kind not in "fiu":
        kinds = {"U": "text", "S": "bytes", "b": "booleans", "c": "complex numbers"}
        return None, f"holds {kinds.get(arr.dtype.kind, arr.dtype.name)}, expected numbers"
    return arr.astype(np.float64, copy=False), ""


def check_rows(
    rows: Any,
    *,
    shape: Sequence[int] | None,
    bounds: tuple[float, float],
    max_rows: int = MAX_ROWS,
) -> tuple[Tensor | None, list[int], dict[int, str]]:
    """Check each row; returns ``(x_good, good_index, bad)`` where ``x_good`` stacks the good rows
    (float32, shape ``(G, *shape)``; ``None`` when none is good), ``good_index`` their positions
    and ``bad`` maps a position to the reason it was refused.

    ``shape`` is the input shape the model expects (without the batch dimension); ``None``
    takes the most common shape among the rows and refuses rows of any other.
    """
    if isinstance(rows, Tensor | np.ndarray):
        if rows.ndim == 0:
            raise ValueError("inputs: expected a batch (a list of inputs), got a scalar")
        n = rows.shape[0]
        items: Sequence[Any] = list(rows)
    elif isinstance(rows, list | tuple):
        n = len(rows)
        items = rows
    else:
        raise ValueError(f"inputs: expected a list of inputs, got {type(rows).__name__}")
    if n > max_rows:
        raise ValueError(f"inputs: {n} rows is more than the limit of {max_rows}; send fewer")
    lo, hi = bounds
    arrays: list[tuple[int, np.ndarray]] = []
    bad: dict[int, str] = {}
    for i, row in enumerate(items):
        arr, why = _row_array(row)
        if arr is None:
            bad[i] = why
        else:
            arrays.append((i, arr))
    want = tuple(shape) if shape is not None else None
    if want is None and arrays:
        # no declared shape: the most common one wins, so one odd row first in the batch does
        # not get the good rows after it refused
        counts = Counter(a.shape for _, a in arrays)
        want = max(counts, key=lambda s: counts[s])
    good: list[np.ndarray] = []
    index: list[int] = []
    for i, arr in arrays:
        if arr.shape != want:
            bad[i] = f"shape {list(arr.shape)}, expected {list(want or ())}"
            continue
        finite = np.isfinite(arr)
        if not finite.all():
            kind = "NaN" if np.isnan(arr).any() else "an infinity"
            bad[i] = f"holds {kind}"
            continue
        if arr.size and (arr.min() < lo or arr.max() > hi):
            bad[i] = (
                f"values in [{arr.min():.4g}, {arr.max():.4g}], expected within [{lo:g}, {hi:g}]"
                " (the model's input bounds)"
            )
            continue
        good.append(arr)
        index.append(i)
    if not good:
        return None, [], bad
    x = torch.from_numpy(np.stack(good)).to(torch.float32)
    return x, index, bad
