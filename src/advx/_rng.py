"""Random numbers keyed by (seed, sample index, key), computed on the tensors' device.

An attack's result for one sample must not depend on which other samples share its batch, on
the batch size, or on how many processes split the data. A stateful generator cannot give that:
its stream is consumed by whatever came before. So each draw here is a pure function of
(seed, global sample index, the caller's key, position in the sample): a 32-bit integer hash
("lowbias32", an avalanche hash) evaluated elementwise, vectorized over the batch, no host
round-trip. The caller's key names the draw (e.g. restart r, iteration t).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2**32 for h in [0, 2**32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _mix(h: Tensor) -> Tensor:
    h = h & _M32
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def _mix_int(h: int) -> int:
    """The same hash on a Python int (for seeds and keys)."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def _combine(h: int, v: int) -> int:
    return _mix_int(h ^ _mix_int(v + 0x9E3779B9))


class SampleRNG:
    """Per-sample random streams. ``index`` holds the global index of each row of the batch."""

    __slots__ = ("seed", "index")

    def __init__(self, seed: int, index: Tensor) -> None:
        self.seed = int(seed)
        self.index = index.to(torch.long)

    def select(self, idx: Tensor) -> SampleRNG:
        return SampleRNG(self.seed, self.index[idx])

    def __len__(self) -> int:
        return self.index.numel()

    def _bits(self, key: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
        """Uniform 32-bit integers (in int64) of shape (N, *shape)."""
        k = _mix_int(self.seed & _M32) ^ _mix_int((self.seed >> 32) + 0x632BE5AB)
        for part in key:
            k = _combine(k, int(part) & _M32)
            k = _combine(k, (int(part) >> 32) & _M32)
        # per-sample state: (N,)
        idx = self.index
        state = _mix(_mix(idx & _M32) ^ (idx >> 32) ^ k)
        state = _mix(state + 0x2545F491)
        m = math.prod(shape)
        j = torch.arange(m, device=idx.device, dtype=torch.long)
        h = _mix(state.view(-1, 1) ^ _mix(j * 2 + 1).view(1, -1))  # (N, m)
        h = _mix(h + state.view(-1, 1))
        return h.view(len(idx), *shape)

    def uniform(self, *key: int, shape: tuple[int, ...] = (), dtype=torch.float32) -> Tensor:
        """Uniform in [0, 1), shape (N, *shape)."""
        u = (self._bits(key, shape) >> 8).to(torch.float64) * (1.0 / (1 << 24))
        return u.to(dtype)

    def normal(self, *key: int, shape: tuple[int, ...] = (), dtype=torch.float32) -> Tensor:
        """Standard normal (Box-Muller), shape (N, *shape)."""
        both = self.uniform(*key, shape=(2, *shape), dtype=torch.float64)
        u1 = 1.0 - both[:, 0]  # in (0, 1]: log is finite
        u2 = both[:, 1]
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)

    def randint(self, *key: int, high: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """Integers in [0, high), shape (N, *shape); ``high`` may be per sample (N,)."""
        u = self.uniform(*key, shape=shape, dtype=torch.float64)
        if isinstance(high, Tensor):
            high = high.to(u.device, torch.float64).view(-1, *([1] * len(shape)))
        top = torch.as_tensor(high - 1, dtype=u.dtype, device=u.device)
        return torch.minimum(torch.floor(u * high), top).to(torch.long)

    def exponential(self, *key: int, shape: tuple[int, ...] = (), dtype=torch.float32) -> Tensor:
        u = self.uniform(*key, shape=shape, dtype=torch.float64)
        return (-torch.log1p(-u)).to(dtype)

    def sign(self, *key: int, shape: tuple[int, ...] = (), dtype=torch.float32) -> Tensor:
        return (self._bits(key, shape) >> 31).to(dtype) * 2 - 1


def derive_seed(seed: int, *key: int) -> int:
    """A new integer seed derived from ``seed`` and a key (e.g. a sub-attack's position)."""
    k = _mix_int(seed & _M32) ^ _mix_int((seed >> 32) + 0x632BE5AB)
    for part in key:
        k = _combine(k, int(part) & _M32)
    return k
