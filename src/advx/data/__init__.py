"""Data: the embedded demo set and loaders for idx, npz and folders of images.

Every loader returns ``(x, y)``: float32 images in [0, 1] of shape (N, C, H, W) and int64
labels of shape (N,). Nothing is downloaded.

The embedded ``mnist-demo`` set is the first 5,000 images of the official MNIST test set,
unmodified (LeCun, Cortes & Burges; CC BY-SA 3.0). Its ``test`` split is images 0-999, its
``train`` split images 1000-4999.
"""

from __future__ import annotations

import gzip
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import sha256_tensors
from ..errors import InputError
from .folders import (
    ArrayDataset,
    ImageFolder,
    is_cifar_folder,
    is_hf_folder,
    load_cifar_batches,
    open_dataset,
)
from .sources import Source, as_batches, as_source

__all__ = [
    "load",
    "load_idx",
    "load_npz",
    "load_image_folder",
    "data_sha256",
    "DEMO_SPLITS",
    "NAMES",
    "as_batches",
    "as_source",
    "Source",
    "ImageFolder",
    "ArrayDataset",
    "load_cifar_batches",
    "open_dataset",
]

DEMO_SPLITS = {"test": (0, 1000), "train": (1000, 5000), "all": (0, 5000)}
NAMES = ("mnist-demo",)
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load(
    source: str | os.PathLike, *, split: str | None = None, n: int | None = None
) -> tuple[Tensor, Tensor]:
    """Load a data set by name or path.

    ``source`` is ``"mnist-demo"`` (embedded), an ``.npz`` file with ``x`` and ``y``, an idx
    images file (its labels file is found beside it), a folder holding MNIST's idx files
    (``split`` picks ``train`` or ``test``), a folder of images with one sub-folder per class,
    torchvision's CIFAR-10 folder (``cifar-10-batches-py``) or a Hugging Face ``save_to_disk``
    folder. ``n`` keeps the first n samples. All in memory: :func:`open_dataset` and
    :func:`as_source` read them chunk by chunk instead.
    """
    name = str(source)
    if name.lower() in NAMES:
        x, y = _load_demo(split or "all")
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise InputError(
                f"data: {name!r} is neither a built-in data set ({', '.join(NAMES)}) "
                "nor an existing path"
            )
        if path.is_dir() and (is_cifar_folder(path) or is_hf_folder(path)):
            x, y = _materialise(open_dataset(path, split=split, n=n))
        elif path.is_dir():
            idx = _find_idx(path, split)
            x, y = load_idx(*idx) if idx else load_image_folder(path)
        elif path.suffix == ".npz":
            x, y = load_npz(path)
        elif "idx3" in path.name or "images" in path.name:
            x, y = load_idx(path, _labels_beside(path))
        else:
            raise InputError(
                f"data: cannot tell the format of {name!r}; expected .npz, an idx file or a folder"
            )
    if n is not None:
        if n < 1:
            raise InputError(f"n: expected a positive number of samples, got {n}")
        x, y = x[:n], y[:n]
    return x, y


def _materialise(ds) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*as_batches(ds, batch_size=1000))
    return torch.cat(xs), torch.cat(ys)


def _load_demo(split: str) -> tuple[Tensor, Tensor]:
    if split not in DEMO_SPLITS:
        raise InputError(
            f"split: the mnist-demo splits are {', '.join(DEMO_SPLITS)}, got {split!r}"
        )
    root = resources.files(__package__) / "_embedded"
    with (
        resources.as_file(root / "mnist-demo-images-idx3-ubyte.gz") as images,
        resources.as_file(root / "mnist-demo-labels-idx1-ubyte.gz") as labels,
    ):
        x, y = load_idx(images, labels)
    a, b = DEMO_SPLITS[split]
    return x[a:b], y[a:b]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f"data: cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(f"data: {path} is not an idx file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(dims)) if dims else 0
    body = np.frombuffer(data, dtype=dtype, count=count, offset=4 + 4 * ndim)
    return body.reshape(dims)


def load_idx(images: str | os.PathLike, labels: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """MNIST-style idx files (gzip or not): images (N, H, W) uint8 and labels (N,)."""
    xi = _read_idx(Path(images))
    yi = _read_idx(Path(labels))
    if xi.shape[0] != yi.shape[0]:
        raise InputError(
            f"data: {xi.shape[0]} images but {yi.shape[0]} labels in {images} / {labels}"
        )
    return _to_tensors(xi, yi, channels_last=False)


def load_npz(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """An ``.npz`` with ``x`` (N, H, W), (N, H, W, C) or (N, C, H, W) and ``y`` (N,)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise InputError(
                    f"data: {path} must hold arrays 'x' and 'y', found {sorted(f.files)}"
                )
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as e:
        raise InputError(f"data: cannot read {path}: {e}") from None
    if len(x) != len(y):
        raise InputError(f"data: {len(x)} images but {len(y)} labels in {path}")
    channels_last = x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    return _to_tensors(x, y, channels_last=channels_last)


def load_image_folder(root: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """``root/<class name>/*.png|jpg``: classes in sorted order of their folder names.

    Needs Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            "data: reading a folder of images needs Pillow: pip install 'advx[image]'"
        ) from None
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise InputError(
            f"data: {root} has no class sub-folders (expected root/<class>/<image files>)"
        )
    images, labels = [], []
    for k, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() not in (
                ".png",
                ".jpg",
                ".jpeg",
                ".bmp",
                ".gif",
                ".tif",
                ".tiff",
                ".webp",
            ):
                continue
            with Image.open(f) as im:
                images.append(
                    np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
                )
            labels.append(k)
    if not images:
        raise InputError(f"data: no images found under {root}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(
            f"data: images under {root} have different sizes {sorted(shapes)[:3]}; "
            "resize them first"
        )
    x = np.stack(images)
    return _to_tensors(x, np.asarray(labels), channels_last=x.ndim == 4)


def _to_tensors(x: np.ndarray, y: np.ndarray, *, channels_last: bool) -> tuple[Tensor, Tensor]:
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif channels_last:
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if x.dtype == np.uint8:
        xt = torch.from_numpy(np.array(x, dtype=np.uint8, copy=True)).float().div_(255.0)
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if xt.numel() and (float(xt.min()) < 0 or float(xt.max()) > 1):
            raise InputError(
                "data: float images must lie in [0, 1]; store uint8 or scale them first"
            )
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"data: labels must be integers, got dtype {y.dtype}")
    return xt, torch.from_numpy(np.asarray(y, dtype=np.int64).reshape(-1))


def _labels_beside(images: Path) -> Path:
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    path = images.with_name(name)
    if not path.exists():
        raise InputError(f"data: no labels file {path.name} beside {images}")
    return path


def _find_idx(folder: Path, split: str | None) -> tuple[Path, Path] | None:
    prefix = {"test": "t10k", "train": "train", None: "t10k"}.get(split)
    if prefix is None:
        raise InputError(f"split: expected train or test for an idx folder, got {split!r}")
    for suffix in ("-images-idx3-ubyte.gz", "-images-idx3-ubyte", "-images.idx3-ubyte"):
        images = folder / f"{prefix}{suffix}"
        if images.exists():
            return images, _labels_beside(images)
    return None


def data_sha256(x: Tensor, y: Tensor) -> str:
    """A fingerprint of a data set as the attack saw it (float32 images and int64 labels)."""
    return sha256_tensors(x.detach().to("cpu", torch.float32), y.detach().to("cpu", torch.int64))
