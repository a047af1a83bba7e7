"""Where a :func:`advx.training.fit` run gets its batches from, and the augmentation applied to
them on the model's device.

The data may be tensors ``(x, y)``, a map-style ``torch.utils.data.Dataset`` of ``(image,
label)`` pairs, or a ``DataLoader`` yielding ``(images, labels)`` batches:

* tensors and a Dataset are indexed by fit's own seeded sampler (the order, the monitor's
  held-out rows and the split across processes are fit's; a Dataset stays where it is -- on
  disk, say -- and only each batch's items are read);
* a DataLoader is iterated as the user built it (its batch size, sampler, workers and
  ``collate_fn``). fit seeds torch's global RNG and any ``generator`` of the loader or its
  sampler from (seed, epoch) before each epoch, so the shuffle is reproducible and a resumed
  run sees what an uninterrupted one would.

Augmentation (``augment="crop-flip"``): the CIFAR-10 recipe of He et al. -- a random crop of
the image padded by 4 pixels on each side, then a horizontal flip with probability 1/2 -- done
per batch on the device. The offsets and flips come from per-sample streams keyed by (seed,
epoch, sample id), so they do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._rng import SampleRNG, derive_seed
from .._validate import check_images, check_labels
from ..data.sources import split_pair
from ..errors import InputError

__all__ = ["AUGMENTS", "check_augment", "crop_flip", "Source", "as_source"]

AUGMENTS = ("crop-flip",)
_PAD = 4
_MAPPING_HINT = (
    "map it to (images, labels), e.g. with collate_fn=lambda items: "
    "(torch.stack([it['image'] for it in items]), torch.tensor([it['label'] for it in items]))"
)


def check_augment(value: Any) -> str | None:
    """None or the name of an augmentation (``"crop-flip"``; ``"crop_flip"`` is accepted)."""
    if value is None or value is False:
        return None
    name = value.replace("_", "-").lower() if isinstance(value, str) else None
    if name in ("none", ""):
        return None
    if name not in AUGMENTS:
        raise InputError(
            f"fit: augment must be None or 'crop-flip' (random crop with padding {_PAD} and "
            f"horizontal flip, for CIFAR-10-shaped images), got {value!r}"
        )
    return name


def crop_flip(
    x: Tensor, rng: SampleRNG, *, pad: int = _PAD, fill: float = 0.0, key: int = 0
) -> Tensor:
    """A random ``pad``-padded crop (of the original size) and a horizontal flip with
    probability 1/2, per sample of the batch (N, C, H, W), drawn from ``rng``."""
    if x.dim() != 4:
        raise InputError(
            f"fit: augment='crop-flip' needs image batches (N, C, H, W), got shape "
            f"{tuple(x.shape)}; pass augment=None for other data"
        )
    n, _, h, w = x.shape
    if n == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
    off = rng.randint(key, 1, high=2 * pad + 1, shape=(2,)).to(x.device)  # (N, 2): top, left
    flip = rng.randint(key, 2, high=2).to(x.device).bool()  # (N,)
    rows = off[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = off[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    # a flipped crop reads its columns right to left
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    n_idx = torch.arange(n, device=x.device)[:, None, None]
    # advanced indices around a slice: the result is (N, H, W, C)
    out = padded[n_idx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def augment_rng(seed: int, epoch: int, index: Tensor) -> SampleRNG:
    return SampleRNG(derive_seed(seed, 0xA06E, epoch), index)


# ---- the data -------------------------------------------------------------------------------
def _pair(item: Any, what: str) -> tuple[Any, Any]:
    """(x, y) out of a Dataset item or a DataLoader batch (the data layer's splitting), or an
    error saying how to map it -- with a ``collate_fn``: fit takes no ``keys=`` or
    ``batch_fn=``, unlike the audit."""

    def refuse(kind: str, item: Any) -> InputError:
        if kind == "dict":
            return InputError(
                f"fit: the {what} yields dicts (keys {sorted(map(str, item))}); fit needs "
                f"(image, label) pairs: {_MAPPING_HINT}"
            )
        if kind == "tuple":
            return InputError(
                f"fit: the {what} yields {len(item)}-tuples; fit needs (image, label) pairs: "
                "drop the extra fields, e.g. with collate_fn=lambda items: "
                "torch.utils.data.default_collate([(it[0], it[1]) for it in items])"
            )
        return InputError(
            f"fit: the {what} yields {type(item).__name__}s; fit needs (image, label) pairs: "
            f"{_MAPPING_HINT}"
        )

    return split_pair(item, refuse=refuse)


def _image(xi: Any) -> Tensor:
    if isinstance(xi, Tensor):
        return xi
    try:
        return torch.as_tensor(xi)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(
            f"fit: the Dataset yields {type(xi).__name__} images; fit needs tensors in the "
            "model's bounds, e.g. with transform=torchvision.transforms.ToTensor()"
        ) from None


def _label(yi: Any) -> int:
    t = torch.as_tensor(yi)
    if t.numel() != 1 or torch.is_floating_point(t) and float(t) != round(float(t)):
        raise InputError(
            f"fit: the Dataset yields labels of shape {tuple(t.shape)} ({t.dtype}); fit needs "
            "one class index per sample (one-hot? convert with label.argmax())"
        )
    return int(t)


@dataclass
class Source:
    """The training data as fit sees it: ``n`` samples (None: a DataLoader of unknown size)
    either indexable (``take``) or a stream (``loader``)."""

    kind: str  # "tensors", "Dataset" or "DataLoader"
    n: int | None
    x: Tensor | None = None
    y: Tensor | None = None
    dataset: Any = None
    loader: Any = None
    bounds: tuple[float, float] = (0.0, 1.0)

    @property
    def indexable(self) -> bool:
        return self.loader is None

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``idx`` (CPU long) as (x, y); a Dataset's items are read and stacked."""
        if self.x is not None and self.y is not None:
            i = idx.to(self.x.device)
            return self.x[i], self.y[i]
        xs, ys = [], []
        for i in idx.tolist():
            xi, yi = _pair(self.dataset[i], "Dataset")
            xs.append(_image(xi))
            ys.append(_label(yi))
        if not xs:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return self.checked(torch.stack(xs), torch.tensor(ys, dtype=torch.long))

    def checked(self, xb: Any, yb: Any) -> tuple[Tensor, Tensor]:
        """A batch from a Dataset or a DataLoader, held to what fit asks of tensors."""
        xb = check_images(xb, self.bounds, name=f"x (from the {self.kind})")
        yb = check_labels(yb, xb.shape[0], xb.device, name=f"y (from the {self.kind})")
        return xb, yb

    def first(self) -> Tensor:
        """One sample (1, ...): the model's number of classes is read off it."""
        if self.indexable:
            return self.take(torch.zeros(1, dtype=torch.long))[0]
        # a shuffling loader draws from torch's global RNG: the caller's is left as it was
        with torch.random.fork_rng(devices=[]):
            for batch in self.loader:
                return self.checked(*_pair(batch, "DataLoader"))[0][:1]
        raise InputError("fit: the DataLoader yields no batches")

    def stream(self, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """A DataLoader's batches for ``epoch``, its shuffle seeded from (seed, epoch)."""
        s = derive_seed(seed, 0xDA7A, epoch)
        torch.manual_seed(s)  # a loader without its own generator shuffles by the global RNG
        for holder in (self.loader, getattr(self.loader, "sampler", None)):
            gen = getattr(holder, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(s)
        for batch in self.loader:
            yield self.checked(*_pair(batch, "DataLoader"))

    def gather(self, k: int, seed: int) -> tuple[Tensor, Tensor]:
        """The first ``k`` samples of a seeded pass over a DataLoader (its monitor set)."""
        xs, ys, got = [], [], 0
        with torch.random.fork_rng(devices=[]):  # stream seeds the global RNG: not the caller's
            for xb, yb in self.stream(seed, -1):
                xs.append(xb[: k - got].cpu())
                ys.append(yb[: k - got].cpu())
                got += xs[-1].shape[0]
                if got >= k:
                    break
        return torch.cat(xs), torch.cat(ys)

    def fingerprint(self) -> dict[str, Any]:
        """What the checkpoint records of the data (and resume compares)."""
        if self.x is not None and self.y is not None:
            from ..data import data_sha256

            return {"sha256": data_sha256(self.x, self.y), "n": int(self.x.shape[0])}
        # hashing a Dataset would read all of it: the size and the type stand in
        held = self.dataset if self.dataset is not None else self.loader.dataset
        return {"sha256": None, "n": self.n, "source": f"{self.kind}({type(held).__name__})"}


def as_source(x: Any, y: Any, bounds: tuple[float, float]) -> Source:
    """The training data, from tensors, a Dataset or a DataLoader."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(x, (DataLoader, Dataset)):
        kind = "DataLoader" if isinstance(x, DataLoader) else "Dataset"
        if y is not None:
            raise InputError(
                f"fit: y must be None when the data is a {kind} (it yields the labels); "
                f"pass fit(model, data) alone"
            )
        if isinstance(x, IterableDataset):
            raise InputError(
                "fit: an IterableDataset has no indices to sample from; wrap it in a "
                "DataLoader(dataset, batch_size=...) and pass the DataLoader"
            )
        if not isinstance(x, DataLoader):
            if not isinstance(x, Sized):
                raise InputError("fit: the Dataset has no len(); give it __len__")
            if len(x) == 0:
                raise InputError("fit: no training samples (the Dataset is empty)")
            return Source(kind, len(x), dataset=x, bounds=bounds)
        n = len(x.dataset) if isinstance(x.dataset, Sized) else None
        try:
            len(x)
        except TypeError:
            raise InputError(
                "fit: the DataLoader has no len() (its dataset has none): the learning-rate "
                "schedule and the progress bar need the number of batches; give the dataset "
                "__len__"
            ) from None
        return Source(kind, n, loader=x, bounds=bounds)
    if y is None:
        raise InputError(
            "fit: y is missing: pass fit(model, x, y) with tensors, or a Dataset or a "
            "DataLoader of (image, label) pairs alone"
        )
    x = check_images(x, bounds)
    if x.shape[0] == 0:
        raise InputError("fit: no training samples")
    y = check_labels(y, x.shape[0], x.device)
    return Source("tensors", int(x.shape[0]), x=x, y=y, bounds=bounds)
