"""Samples as users hold them: tensors, a ``Dataset``, a ``DataLoader`` or any re-iterable of
batches, read as normalised CPU batches.

Two layers:

- :func:`as_batches` turns anything into ``(x, y)`` batches: float images (N, ...) and int64
  labels (N,) on the CPU. It is the one place that understands dict batches, ``(x, y, extra)``
  tuples, 8-bit images and one-hot labels, so every entry point (the audit, training) accepts
  the same inputs and refuses the same bad ones with the same words.
- :class:`Source` is what the audit reads: the samples in a fixed order, read as often as needed
  (one pass to count, check and fingerprint them, then one pass per stage of the cascade over
  the samples still robust), never held in memory all at once. Tensors and map-style datasets
  are also read by index (``take``); a ``DataLoader`` is read in order.
"""

from __future__ import annotations

import bisect
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import tensor_bytes
from .._validate import check_images
from ..errors import InputError
from .prefetch import prefetch

__all__ = ["as_batches", "as_source", "split_pair", "Source", "Scan", "Keys", "Refusal"]

Keys = tuple[Any, Any]
BatchFn = Callable[[Any], tuple[Any, Any]]

# names that usually hold the images and the labels in a dict batch, to suggest ``keys=``
_IMAGE_KEYS = ("image", "images", "img", "pixel_values", "x", "input", "inputs", "data")
_LABEL_KEYS = ("label", "labels", "y", "target", "targets", "class", "fine_label")


# ---- one batch (or one sample) made into (x, y) ---------------------------------------------
#: builds the error for a batch (or sample) that is not an (images, labels) pair: called with
#: what it is ("dict", "tuple": of another length, "other") and the item itself
Refusal = Callable[[str, Any], InputError]


def split_pair(
    item: Any,
    *,
    keys: Keys | None = None,
    batch_fn: BatchFn | None = None,
    refuse: Refusal | None = None,
):
    """The (images, labels) of one batch or sample as the user's data yields it.

    ``refuse`` words the error for items that are not pairs (the audit's, by default, points
    to ``keys=`` and ``batch_fn=``; training's points to ``collate_fn``)."""
    if batch_fn is not None:
        out = batch_fn(item)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise InputError(
                f"batch_fn: must return (images, labels), got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        return out[0], out[1]
    if keys is not None:
        try:
            return item[keys[0]], item[keys[1]]
        except (KeyError, IndexError, TypeError):
            have = list(item.keys()) if isinstance(item, dict) else _describe(item)
            raise InputError(
                f"keys: {tuple(keys)!r} do not select the images and labels of a batch ({have})"
            ) from None
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    kind = (
        "dict"
        if isinstance(item, dict)
        else "tuple"
        if isinstance(item, (tuple, list))
        else "other"
    )
    raise (refuse or _refuse)(kind, item)


def _refuse(kind: str, item: Any) -> InputError:
    """The audit's words for a batch that is not (images, labels): how to map it."""
    if kind == "dict":
        names = list(item.keys())
        img = next((k for k in _IMAGE_KEYS if k in item), "image")
        lab = next((k for k in _LABEL_KEYS if k in item), "label")
        return InputError(
            f"data: the batches are dicts with keys {names}; say which hold the images and the "
            f"labels: keys=({img!r}, {lab!r}) (command line: --data-keys {img},{lab}), or "
            "batch_fn=lambda b: (b[...], b[...])"
        )
    if kind == "tuple":
        return InputError(
            f"data: the batches are {len(item)}-tuples ({_describe(item)}); say which hold the "
            "images and the labels: keys=(0, 1) for (images, labels, ...), or "
            "batch_fn=lambda b: (b[0], b[1])"
        )
    return InputError(
        f"data: expected (images, labels) batches, got {type(item).__name__}; a Dataset must "
        "return (image, label) pairs (or pass keys= / batch_fn=)"
    )


def _describe(item: Any) -> str:
    try:
        return ", ".join(
            f"{type(v).__name__}{tuple(v.shape) if hasattr(v, 'shape') else ''}" for v in item
        )
    except TypeError:
        return type(item).__name__


class _Notes:
    """Warnings said once per source (not once per batch)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)


def to_images(x: Any, bounds: tuple[float, float], notes: _Notes | None = None) -> Tensor:
    """A batch of images as a float tensor: 8-bit integers scaled into ``bounds`` (with a note),
    other integers refused."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        if type(x).__module__.startswith("PIL"):
            raise InputError(
                "data: the samples are PIL images; add a transform that makes tensors "
                "(torchvision.transforms.ToTensor()), or read the folder with "
                "advx.data.ImageFolder(root, resize=...)"
            )
        raise InputError(f"data: expected image tensors, got {type(x).__name__}")
    if torch.is_floating_point(x):
        return x
    lo, hi = bounds
    if x.dtype == torch.uint8 and float(hi) >= 255 and float(lo) <= 0:
        return x.float()  # the model takes 0..255 itself
    if x.dtype == torch.uint8 and (float(lo), float(hi)) == (0.0, 1.0):
        if notes is not None:
            notes.once(
                "uint8",
                "data: 8-bit images (0..255) scaled by 1/255 into the model's bounds [0, 1]; pass "
                "float images in [0, 1] to silence this",
            )
        return x.float().div_(255.0)
    raise InputError(
        f"data: images of dtype {x.dtype} for a model with bounds [{lo:g}, {hi:g}]; convert them "
        f"to float in [{lo:g}, {hi:g}] (e.g. x.float() / 255 for 8-bit images)"
    )


def to_labels(y: Any, n: int, notes: _Notes | None = None) -> Tensor:
    """Labels (n,) int64: class indices, or one-hot rows made into indices (with a note)."""
    if isinstance(y, (int, np.integer)):
        y = torch.tensor([int(y)])
    elif isinstance(y, (list, tuple)):
        y = torch.as_tensor(y)
    elif isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if not isinstance(y, Tensor):
        raise InputError(f"y: expected integer class labels, got {type(y).__name__}")
    if y.dim() == 2 and y.shape[0] == n and y.shape[1] > 1:
        yf = y.double()
        if bool(((yf == 0) | (yf == 1)).all()) and bool((yf.sum(1) == 1).all()):
            if notes is not None:
                notes.once(
                    "onehot",
                    f"y: one-hot labels (N, {y.shape[1]}) made into class indices with argmax",
                )
            return y.argmax(1).long().cpu()
        raise InputError(
            f"y: labels of shape {tuple(y.shape)} are not one-hot (soft or multi-label rows); the "
            "audit needs one class index per sample: pass y.argmax(1) if that is what you mean"
        )
    y = y.reshape(-1)
    if y.numel() != n:
        raise InputError(f"y: {y.numel()} labels for {n} images; give one class index per image")
    if torch.is_floating_point(y):
        if not bool((y == y.round()).all()):
            raise InputError("y: labels must be class indices (integers), got fractional values")
    elif y.dtype == torch.bool:
        raise InputError("y: labels must be class indices (integers), got booleans")
    return y.long().cpu()


def _stack_samples(items: list[Any], who: Callable[[int], str]) -> Any:
    """Stack per-sample images into a batch; a clear error when their sizes differ."""
    first = items[0]
    if isinstance(first, np.ndarray):
        items = [torch.from_numpy(np.asarray(i)) for i in items]
        first = items[0]
    if not isinstance(first, Tensor):
        return to_images(first, (0.0, 1.0))  # raises the type's error
    shapes = [tuple(t.shape) for t in items]
    if len(set(shapes)) > 1:
        j = next(i for i, s in enumerate(shapes) if s != shapes[0])
        raise InputError(
            f"data: samples differ in size: {who(0)} is {shapes[0]}, {who(j)} is {shapes[j]}; "
            "resize them to one size first (advx.data.ImageFolder(root, resize=..., "
            "center_crop=...); command line: --resize N --center-crop N)"
        )
    return torch.stack(items)


# ---- the public layer -----------------------------------------------------------------------
def as_batches(
    data: Any,
    y: Any = None,
    *,
    batch_size: int = 256,
    keys: Keys | None = None,
    batch_fn: BatchFn | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches from tensors, a ``Dataset``, a ``DataLoader`` or any re-iterable of
    batches: x float (B, ...) in ``bounds``, y int64 (B,), both on the CPU (or where the given
    tensors are).

    ``keys`` picks the images and labels of dict or tuple batches (``("image", "label")``,
    ``(0, 1)``); ``batch_fn`` maps a batch to ``(x, y)`` instead. 8-bit images are scaled into
    [0, 1] with a warning; one-hot labels become indices with a warning. A ``DataLoader`` keeps
    its own batch size (``batch_size`` applies to tensors and datasets).
    """
    source = as_source(data, y, keys=keys, batch_fn=batch_fn, bounds=bounds)
    for _, xb, yb in source.batches(batch_size):
        yield xb, yb


def as_source(
    data: Any,
    y: Any = None,
    *,
    keys: Keys | None = None,
    batch_fn: BatchFn | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    names: Sequence[str] | None = None,
) -> Source:
    """The :class:`Source` for ``data`` (and ``y`` when ``data`` is a tensor of images)."""
    if isinstance(data, Source):
        return data
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, (Tensor, np.ndarray)):
        if y is None:
            raise InputError(
                "y: images given as a tensor need their labels: pass y (one class index per image)"
            )
        return TensorSource(data, y, bounds=bounds, names=names)
    if y is not None:
        raise InputError(
            f"y: the labels come from the {type(data).__name__}; pass y only with a tensor of "
            "images"
        )
    if isinstance(data, DataLoader):
        return LoaderSource(data, keys=keys, batch_fn=batch_fn, bounds=bounds, names=names)
    if isinstance(data, IterableDataset):
        return LoaderSource(data, keys=keys, batch_fn=batch_fn, bounds=bounds, names=names)
    if isinstance(data, (list, tuple)):
        if len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor):
            return TensorSource(data[0], data[1], bounds=bounds, names=names)  # (x, y)
        # a list of batches (a list of samples is a Dataset: wrap it in one)
        return LoaderSource(data, keys=keys, batch_fn=batch_fn, bounds=bounds, names=names)
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return DatasetSource(data, keys=keys, batch_fn=batch_fn, bounds=bounds, names=names)
    if isinstance(data, Iterable):
        if iter(data) is data:
            raise InputError(
                "data: a generator or iterator can be read only once, and the audit reads the "
                "samples several times (a count, then once per stage); pass a Dataset, a "
                "DataLoader or a list of batches"
            )
        return LoaderSource(data, keys=keys, batch_fn=batch_fn, bounds=bounds, names=names)
    raise InputError(
        f"data: expected tensors, a torch Dataset or a DataLoader, got {type(data).__name__}"
    )


# ---- sources --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scan:
    """What one pass over a source found: how many samples, their labels, the shape and dtype
    of one image, and the sha256 of the data as :func:`advx.data.data_sha256` computes it."""

    n: int
    y: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    sha256: str


class Source:
    """Samples in a fixed order, read in batches as often as needed."""

    #: whether :meth:`take` reads just the rows asked (else it reads the samples in order)
    random_access = False
    names: list[str] | None = None

    def __init__(self, *, bounds: tuple[float, float]) -> None:
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self._notes = _Notes()
        self._scan: Scan | None = None

    # subclasses give _raw_batches (in order) and, for random access, _take
    def _raw_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def _take(self, rows: Tensor) -> tuple[Any, Any]:
        raise NotImplementedError

    def _normal(self, xb: Any, yb: Any, start: int) -> tuple[Tensor, Tensor]:
        xb = to_images(xb, self.bounds, self._notes)
        if xb.dim() < 2:
            raise InputError(
                f"data: expected batches of images (N, ...), got shape {tuple(xb.shape)} at "
                f"sample {start}"
            )
        return xb, to_labels(yb, xb.shape[0], self._notes)

    def batches(self, batch_size: int = 256) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(start, x, y)`` for consecutive batches, in the source's order."""
        start = 0
        for xb, yb in self._raw_batches(batch_size):
            xb, yb = self._normal(xb, yb, start)
            yield start, xb, yb
            start += xb.shape[0]

    def scan(self, batch_size: int = 256) -> Scan:
        """One pass: count, check (bounds, one shape) and fingerprint the samples (cached)."""
        if self._scan is not None:
            return self._scan
        h = hashlib.sha256()
        ys: list[Tensor] = []
        shape: tuple[int, ...] | None = None
        dtype = torch.float32
        n = 0
        # the next batch is read while this one is checked and hashed (and the reader stops at
        # once when a batch is refused)
        with closing(prefetch(self.batches(batch_size))) as read:
            for start, xb, yb in read:
                if shape is None:
                    shape, dtype = tuple(xb.shape[1:]), xb.dtype
                elif tuple(xb.shape[1:]) != shape:
                    raise InputError(
                        f"data: samples differ in size: {self._who(0)} is {shape}, "
                        f"{self._who(start)} is {tuple(xb.shape[1:])}; resize them to one size "
                        "(advx.data.ImageFolder(root, resize=..., center_crop=...); command line: "
                        "--resize N --center-crop N)"
                    )
                check_images(xb, self.bounds, name="x")
                h.update(tensor_bytes(xb.detach().to("cpu", torch.float32)))
                ys.append(yb.cpu())
                n += xb.shape[0]
        if n == 0 or shape is None:
            raise InputError("data: no samples to audit")
        y = torch.cat(ys)
        h.update(tensor_bytes(y))
        self._scan = Scan(n=n, y=y, shape=shape, dtype=dtype, sha256=h.hexdigest())
        return self._scan

    def _who(self, i: int) -> str:
        names = self.names
        return f"sample {i} ({names[i]})" if names is not None and i < len(names) else f"sample {i}"

    def take(self, rows: Tensor, *, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """The samples at ``rows`` (sorted ascending), as one batch."""
        rows = rows.cpu().long()
        if rows.numel() == 0:
            sc = self.scan(batch_size)
            return torch.zeros((0, *sc.shape), dtype=sc.dtype), torch.zeros(0, dtype=torch.long)
        if self.random_access:
            xb, yb = self._take(rows)
            return self._normal(xb, yb, int(rows[0]))
        xs, ys = [], []
        for _, part, xb, yb in self.select(rows, batch_size=max(batch_size, rows.numel())):
            xs.append(xb)
            ys.append(yb)
            del part
        return torch.cat(xs), torch.cat(ys)

    def head(self, m: int, *, batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """The first ``m`` samples (reading no further than needed)."""
        return self.take(torch.arange(m), batch_size=batch_size)

    def select(
        self, rows: Tensor, *, batch_size: int
    ) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """The samples at ``rows`` (sorted ascending) in chunks of ``batch_size`` rows:
        ``(first position in rows, the chunk's rows, x, y)``. The chunks are the same whatever
        the source's own batch size, so the work done on them is too."""
        rows = rows.cpu().long()
        if rows.numel() == 0:
            return
        if self.random_access:
            for b in range(0, rows.numel(), batch_size):
                part = rows[b : b + batch_size]
                xb, yb = self.take(part)
                yield b, part, xb, yb
            return
        # in order: keep the wanted rows of each batch until a chunk is full
        want = rows.tolist()
        pos = 0  # next wanted position in rows
        done = 0  # rows handed out so far
        buf_x: list[Tensor] = []
        buf_y: list[Tensor] = []
        held = 0
        last = want[-1]
        for start, xb, yb in self.batches(batch_size):
            end = start + xb.shape[0]
            lo = pos
            pos = bisect.bisect_left(want, end, lo=pos)
            if pos > lo:
                a, b = want[lo] - start, want[pos - 1] - start + 1
                if b - a == pos - lo:  # a run of consecutive rows: a view, not a copy
                    buf_x.append(xb[a:b])
                    buf_y.append(yb[a:b])
                else:
                    local = torch.tensor(want[lo:pos]) - start
                    buf_x.append(xb[local])
                    buf_y.append(yb[local])
                held += pos - lo
            while held >= batch_size or (held and pos == len(want)):
                x_all, y_all = _joined(buf_x), _joined(buf_y)
                k = min(batch_size, held)
                yield done, rows[done : done + k], x_all[:k], y_all[:k]
                done += k
                held -= k
                buf_x, buf_y = ([x_all[k:]], [y_all[k:]]) if held else ([], [])
                del x_all, y_all
            if end > last:
                break  # nothing wanted further on
        if done < rows.numel():
            raise InputError(
                f"data: the source yielded fewer samples this time than when it was first read "
                f"(row {int(rows[done])} is missing); it must give the same samples in the same "
                "order on every pass (a DataLoader with shuffle=False)"
            )


def _joined(parts: list[Tensor]) -> Tensor:
    """One tensor of ``parts`` (no copy when there is one part)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class TensorSource(Source):
    """Images and labels in tensors (or arrays), sliced per batch."""

    random_access = True

    def __init__(self, x, y, *, bounds, names=None) -> None:
        super().__init__(bounds=bounds)
        self.x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        y = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
        if not isinstance(self.x, Tensor):
            raise InputError(f"x: expected a tensor of images, got {type(x).__name__}")
        if self.x.dim() < 2:
            raise InputError(
                f"x: expected a batch of shape (N, ...), got shape {tuple(self.x.shape)}; add "
                "the batch dimension with x.unsqueeze(0)"
            )
        self.y = to_labels(y, self.x.shape[0], self._notes).to(
            self.x.device if isinstance(self.x, Tensor) else "cpu"
        )
        self.names = list(names) if names is not None else None

    def _raw_batches(self, batch_size):
        for b in range(0, self.x.shape[0], batch_size):
            yield self.x[b : b + batch_size], self.y[b : b + batch_size]

    def _take(self, rows):
        r = rows.to(self.x.device)
        return self.x[r], self.y[r]

    def _normal(self, xb, yb, start):
        # the labels were checked once; keep them where the images are
        return to_images(xb, self.bounds, self._notes), yb


class DatasetSource(Source):
    """A map-style dataset: ``dataset[i]`` is one sample (or ``__getitems__`` a list)."""

    random_access = True

    def __init__(self, dataset, *, keys=None, batch_fn=None, bounds, names=None) -> None:
        super().__init__(bounds=bounds)
        self.dataset, self.keys, self.batch_fn = dataset, keys, batch_fn
        self.names = list(names) if names is not None else getattr(dataset, "names", None)

    def _raw_batches(self, batch_size):
        n = len(self.dataset)
        for b in range(0, n, batch_size):
            yield self._take(torch.arange(b, min(b + batch_size, n)))

    def _take(self, rows):
        idx = rows.tolist()
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(idx) if fetch is not None else [self.dataset[i] for i in idx]
        if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], Tensor):
            return items  # a dataset that reads whole batches at once
        pairs = [split_pair(it, keys=self.keys, batch_fn=self.batch_fn) for it in items]
        xs = _stack_samples([p[0] for p in pairs], lambda j: self._who(idx[j]))
        ys = [p[1] for p in pairs]
        if isinstance(ys[0], Tensor):
            yb = torch.stack([t.reshape(-1) if t.dim() else t for t in ys])
            yb = yb.reshape(len(ys), -1) if yb.dim() > 1 and yb.shape[1] > 1 else yb.reshape(-1)
        else:
            yb = torch.as_tensor(np.asarray(ys))
        return xs, yb


class LoaderSource(Source):
    """A ``DataLoader`` (or an iterable dataset, or a list of batches), read in order."""

    def __init__(self, loader, *, keys=None, batch_fn=None, bounds, names=None) -> None:
        super().__init__(bounds=bounds)
        from torch.utils.data import DataLoader, RandomSampler

        if isinstance(loader, DataLoader):
            sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
            if isinstance(sampler, RandomSampler) or isinstance(loader.sampler, RandomSampler):
                raise InputError(
                    "data: the DataLoader shuffles (shuffle=True); the audit reads the samples "
                    "once per stage and needs the same order every time: build it with "
                    "shuffle=False"
                )
        self.loader, self.keys, self.batch_fn = loader, keys, batch_fn
        self.names = (
            list(names)
            if names is not None
            else getattr(getattr(loader, "dataset", None), "names", None)
        )

    def _raw_batches(self, batch_size):
        for item in self.loader:
            yield split_pair(item, keys=self.keys, batch_fn=self.batch_fn)


def rows_view(source: Source, rows: Tensor) -> Source:
    """The samples of ``source`` at ``rows`` (sorted ascending), as a source of their own."""
    return _Rows(source, rows)


class _Rows(Source):
    def __init__(self, base: Source, rows: Tensor) -> None:
        super().__init__(bounds=base.bounds)
        self.base, self.rows = base, rows.cpu().long()
        self.random_access = True  # through the base's take/select
        names = base.names
        self.names = [names[i] for i in self.rows.tolist()] if names is not None else None

    def batches(self, batch_size: int = 256):
        for b, _, xb, yb in self.base.select(self.rows, batch_size=batch_size):
            yield b, xb, yb

    def take(self, rows: Tensor, *, batch_size: int = 256):
        return self.base.take(self.rows[rows.cpu().long()], batch_size=batch_size)

    def select(self, rows: Tensor, *, batch_size: int):
        for b, part, xb, yb in self.base.select(
            self.rows[rows.cpu().long()], batch_size=batch_size
        ):
            yield b, rows.cpu().long()[b : b + part.numel()], xb, yb
