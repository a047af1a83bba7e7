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


def _mix(h: Tensor) -> Tensor:
    """lowbias32 on h in [0, 2**32) held in int64 (the caller masks h to 32 bits).

    ``(h * c) & _M32`` is the 32-bit product: an int64 product of two 32-bit factors may wrap
    around 2**64, which leaves its low 32 bits as they are. Eleven elementwise kernels, and the
    in-place forms allocate nothing after the first.
    """
    h = h ^ (h >> 16)
    h.mul_(0x7FEB352D).bitwise_and_(_M32)
    h.bitwise_xor_(h >> 15)
    h.mul_(0x846CA68B).bitwise_and_(_M32)
    return h.bitwise_xor_(h >> 16)


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


def _key(seed: int, key: tuple[int, ...]) -> int:
    """The 32-bit hash of (seed, key), on the host."""
    k = _mix_int(seed & _M32) ^ _mix_int((seed >> 32) + 0x632BE5AB)
    for part in key:
        k = _combine(k, int(part) & _M32)
        k = _combine(k, (int(part) >> 32) & _M32)
    return k


class SampleRNG:
    """Per-sample random streams. ``index`` holds the global index of each row of the batch."""

    __slots__ = ("seed", "index", "_base", "_positions")

    def __init__(self, seed: int, index: Tensor, *, _base: Tensor | None = None) -> None:
        self.seed = int(seed)
        self.index = index.to(torch.long)
        # the part of each sample's state that does not depend on the key: (N,), made once
        self._base = _base
        # position hashes per draw size m: (m,), the same for every sample and key
        self._positions: dict[int, Tensor] = {}

    def select(self, idx: Tensor) -> SampleRNG:
        out = SampleRNG(self.seed, self.index[idx], _base=self._sample_base()[idx])
        out._positions = self._positions
        return out

    def __len__(self) -> int:
        return self.index.numel()

    def _sample_base(self) -> Tensor:
        if self._base is None:
            idx = self.index
            self._base = _mix(idx & _M32) ^ (idx >> 32)
        return self._base

    def _position_hash(self, m: int) -> Tensor:
        j = self._positions.get(m)
        if j is None or j.device != self.index.device:
            j = _mix(torch.arange(m, device=self.index.device, dtype=torch.long) * 2 + 1)
            self._positions[m] = j
        return j

    def _hash(self, keys: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Uniform 32-bit integers (in int64), (N, K, *shape), for the K key hashes ``keys``."""
        n, m = len(self), math.prod(shape)
        state = _mix(self._sample_base().view(n, 1) ^ keys.view(1, -1))  # (N, K)
        state = _mix(state.add_(0x2545F491).bitwise_and_(_M32)).unsqueeze(2)  # (N, K, 1)
        h = _mix(state ^ self._position_hash(m))  # (N, K, m)
        h = _mix(h.add_(state).bitwise_and_(_M32))
        return h.view(n, keys.numel(), *shape)

    def _bits(self, key: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
        """Uniform 32-bit integers (in int64) of shape (N, *shape)."""
        keys = torch.tensor([_key(self.seed, key)], dtype=torch.long, device=self.index.device)
        return self._hash(keys, shape).squeeze(1)

    def uniform_block(
        self,
        *key: int,
        last: range,
        shape: tuple[int, ...] = (),
        dtype=torch.float32,
    ) -> Tensor:
        """``uniform(*key, t, shape=shape)`` for every t in ``last`` at once, bit for bit:
        (N, len(last), *shape). For a loop that draws every iteration: one draw per block of
        iterations instead of one per iteration."""
        keys = [_key(self.seed, (*key, t)) for t in last]
        keys_t = torch.tensor(keys, dtype=torch.long, device=self.index.device)
        return _to_uniform(self._hash(keys_t, shape), dtype)

    def uniform(self, *key: int, shape: tuple[int, ...] = (), dtype=torch.float32) -> Tensor:
        """Uniform in [0, 1), shape (N, *shape)."""
        return _to_uniform(self._bits(key, shape), dtype)

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


def _to_uniform(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """The top 24 of 32 random bits as a float in [0, 1): exact in float32 and float64, rounded
    once from float64 in a narrower dtype."""
    if dtype in (torch.float32, torch.float64):
        return (bits >> 8).to(dtype).mul_(1.0 / (1 << 24))
    return ((bits >> 8).to(torch.float64) * (1.0 / (1 << 24))).to(dtype)


def derive_seed(seed: int, *key: int) -> int:
    """A new integer seed derived from ``seed`` and a key (e.g. a sub-attack's position)."""
    k = _mix_int(seed & _M32) ^ _mix_int((seed >> 32) + 0x632BE5AB)
    for part in key:
        k = _combine(k, int(part) & _M32)
    return k
