"""Data sets on disk, read lazily: a folder of images (one sub-folder per class), torchvision's
CIFAR-10 folder (``cifar-10-batches-py``), and a Hugging Face ``datasets`` folder
(``save_to_disk``). Each is a map-style ``Dataset`` of ``(image, label)`` with ``names``: one
string per sample (the file, or the batch file and position) so per-sample results map back.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import InputError

__all__ = ["ImageFolder", "ArrayDataset", "load_cifar_batches", "is_cifar_folder", "HFDataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _size(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | int | None:
    if value is None:
        return None
    if isinstance(value, int):
        if value < 1:
            raise InputError(f"{name}: expected a positive size, got {value}")
        return value
    v = tuple(int(s) for s in value)
    if len(v) != 2 or min(v) < 1:
        raise InputError(f"{name}: expected N or (height, width), got {value!r}")
    return v


class ArrayDataset(Dataset):
    """Images held as 8-bit (or float) arrays (N, C, H, W), made float per batch: a whole data
    set in memory at a quarter of its float size."""

    def __init__(self, x: Tensor, y: Tensor, names: Sequence[str] | None = None) -> None:
        self.x, self.y = x, y
        self.names = list(names) if names is not None else None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def _float(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def __getitem__(self, i: int):
        return self._float(self.x[i]), self.y[i]

    def __getitems__(self, idx: list[int]):
        rows = torch.as_tensor(idx, dtype=torch.long)
        return self._float(self.x[rows]), self.y[rows]


class ImageFolder(Dataset):
    """``root/<class>/<image files>``, classes in sorted order of their folder names, read one
    file at a time. ``resize``: N (the shorter side to N, keeping the aspect) or (H, W);
    ``center_crop``: N or (H, W). Needs Pillow."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        resize: int | Sequence[int] | None = None,
        center_crop: int | Sequence[int] | None = None,
    ) -> None:
        try:
            import PIL.Image  # noqa: F401
        except ImportError:
            raise InputError(
                "data: reading a folder of images needs Pillow: pip install 'advx[image]'"
            ) from None
        self.root = Path(root)
        self.resize = _size(resize, "resize")
        self.center_crop = _size(center_crop, "center_crop")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise InputError(
                f"data: {self.root} has no class sub-folders (expected root/<class>/<image files>)"
            )
        self.files: list[tuple[Path, int]] = [
            (f, k)
            for k, c in enumerate(self.classes)
            for f in sorted((self.root / c).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.files:
            raise InputError(f"data: no images found under {self.root}")
        self.names = [str(f.relative_to(self.root)) for f, _ in self.files]
        self._mode: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as im:
            if self._mode is None:  # the first image decides: gray stays gray, else RGB
                self._mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
            im = im.convert(self._mode)
            im = self._fit(im)
            a = np.asarray(im, dtype=np.uint8)
        t = torch.from_numpy(a.copy())
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
        return t.float().div_(255.0), label

    def _fit(self, im):
        from PIL import Image

        if self.resize is not None:
            w, h = im.size
            if isinstance(self.resize, int):
                s = self.resize
                size = (s, max(1, round(h * s / w))) if w <= h else (max(1, round(w * s / h)), s)
            else:
                size = (self.resize[1], self.resize[0])
            im = im.resize(size, Image.Resampling.BILINEAR)
        if self.center_crop is not None:
            ch, cw = (
                (self.center_crop, self.center_crop)
                if isinstance(self.center_crop, int)
                else self.center_crop
            )
            w, h = im.size
            if cw > w or ch > h:
                raise InputError(
                    f"center_crop: {ch}x{cw} is larger than an image of {h}x{w}; pass resize= "
                    "(at least the crop size) too"
                )
            left, top = (w - cw) // 2, (h - ch) // 2
            im = im.crop((left, top, left + cw, top + ch))
        return im


# ---- CIFAR-10 as torchvision keeps it -------------------------------------------------------
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def is_cifar_folder(path: Path) -> bool:
    return (path / "test_batch").exists() or (path / "cifar-10-batches-py" / "test_batch").exists()


class _NumpyOnly(pickle.Unpickler):
    """CIFAR's batch files are pickles of dicts of numpy arrays: allow exactly that, never
    arbitrary objects."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def load_cifar_batches(root: str | os.PathLike, split: str | None = None) -> ArrayDataset:
    """torchvision's ``cifar-10-batches-py`` folder (or the folder holding it): ``split`` test
    (``test_batch``, the default) or train (``data_batch_1..5``). Kept 8-bit in memory."""
    root = Path(root)
    if not (root / "test_batch").exists() and (root / "cifar-10-batches-py").exists():
        root = root / "cifar-10-batches-py"
    split = split or "test"
    if split not in ("test", "train"):
        raise InputError(f"split: expected test or train for a CIFAR-10 folder, got {split!r}")
    files = ("test_batch",) if split == "test" else _CIFAR_TRAIN
    xs, ys, names = [], [], []
    for name in files:
        path = root / name
        try:
            with open(path, "rb") as f:
                d = _NumpyOnly(f, encoding="bytes").load()
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise InputError(f"data: cannot read the CIFAR-10 batch {path}: {e}") from None
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        if data is None or labels is None:
            raise InputError(f"data: {path} is not a CIFAR-10 batch (no data / labels)")
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
        files_in = d.get(b"filenames", d.get("filenames"))
        if files_in is not None:
            names += [f.decode() if isinstance(f, bytes) else str(f) for f in files_in]
        else:
            names += [f"{name}[{i}]" for i in range(len(ys[-1]))]
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    return ArrayDataset(x, y, names)


# ---- Hugging Face datasets ------------------------------------------------------------------
def is_hf_folder(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


class HFDataset(Dataset):
    """A ``datasets.Dataset`` saved with ``save_to_disk`` (needs ``pip install 'advx[hf]'``):
    ``keys`` name its image and label columns."""

    def __init__(
        self, root: str | os.PathLike, *, split: str | None = None, keys: Sequence[str] = ()
    ) -> None:
        try:
            import datasets
        except ImportError:
            raise InputError(
                "data: a Hugging Face dataset folder needs the datasets package: "
                "pip install 'advx[hf]'"
            ) from None
        try:
            ds = datasets.load_from_disk(str(root))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise InputError(
                f"data: cannot read the Hugging Face dataset folder {root} ({e}); write it with "
                "dataset.save_to_disk(folder)"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            split = split or ("test" if "test" in ds else next(iter(ds)))
            if split not in ds:
                raise InputError(f"split: {root} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        cols = list(ds.column_names)
        image: str | None
        label: str | None
        if keys:
            image, label = keys
        else:
            image = next((c for c in ("image", "img", "pixel_values") if c in cols), None)
            label = next((c for c in ("label", "labels", "fine_label") if c in cols), None)
        if image not in cols or label not in cols:
            raise InputError(
                f"data: {root} has columns {cols}; say which hold the images and the labels "
                "with --data-keys IMAGE,LABEL"
            )
        self.ds, self.image, self.label = ds.with_format("numpy"), image, label
        self._raw = ds
        self.names = None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self._raw[int(i)]
        img = row[self.image]
        if hasattr(img, "convert"):  # a PIL image (the datasets Image feature)
            a = np.asarray(img.convert("L" if img.mode in ("L", "1") else "RGB"), dtype=np.uint8)
        else:
            a = np.asarray(img)
        t = torch.from_numpy(np.array(a, copy=True))  # the arrow buffers are read-only
        if t.dim() == 2:
            t = t[None]
        elif t.dim() == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
            t = t.permute(2, 0, 1)
        if t.dtype == torch.uint8:
            t = t.float().div_(255.0)
        return t, int(row[self.label])


# ---- what the command line's --data names ---------------------------------------------------
class _Head(Dataset):
    """The first n samples of a dataset (its names too)."""

    def __init__(self, ds: Dataset, n: int) -> None:
        self.ds, self.n = ds, min(n, len(ds))  # type: ignore[arg-type]
        names = getattr(ds, "names", None)
        self.names = list(names[: self.n]) if names is not None else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]

    def __getitems__(self, idx: list[int]):
        fetch = getattr(self.ds, "__getitems__", None)
        return fetch(idx) if fetch is not None else [self.ds[i] for i in idx]


def open_dataset(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    n: int | None = None,
    resize: int | Sequence[int] | None = None,
    center_crop: int | Sequence[int] | None = None,
    keys: Sequence[str] = (),
) -> Dataset:
    """The map-style dataset ``--data`` names, read lazily where it lives on disk as files:
    ``mnist-demo``, an ``.npz`` (``x``, ``y``, optional ``filenames``), idx files, a folder of
    images (``resize`` / ``center_crop``), a CIFAR-10 ``cifar-10-batches-py`` folder, or a Hugging
    Face ``save_to_disk`` folder."""
    from . import NAMES, load

    name = str(source)
    path = Path(name).expanduser()
    ds: Dataset
    if (resize is not None or center_crop is not None) and not (
        path.is_dir() and not is_cifar_folder(path) and not is_hf_folder(path)
    ):
        raise InputError("--resize / --center-crop: apply to a folder of images only")
    if name.lower() not in NAMES and path.is_dir() and is_cifar_folder(path):
        ds = load_cifar_batches(path, split)
    elif name.lower() not in NAMES and path.is_dir() and is_hf_folder(path):
        ds = HFDataset(path, split=split, keys=tuple(keys))
    elif name.lower() not in NAMES and path.is_dir() and not _has_idx(path):
        ds = ImageFolder(path, resize=resize, center_crop=center_crop)
    elif name.lower() not in NAMES and path.suffix == ".npz" and path.exists():
        ds = _npz(path)
    else:
        x, y = load(source, split=split)
        ds = ArrayDataset(x, y)
    if n is not None:
        if n < 1:
            raise InputError(f"n: expected a positive number of samples, got {n}")
        ds = _Head(ds, n)
    return ds


def _has_idx(folder: Path) -> bool:
    return any("idx3" in f.name for f in folder.iterdir())


def _npz(path: Path) -> Dataset:
    from . import load_npz

    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f or f["x"].dtype != np.uint8:
                raise LookupError
            x, y = f["x"], f["y"]
            names = [str(s) for s in f["filenames"].tolist()] if "filenames" in f else None
    except LookupError:
        return ArrayDataset(*load_npz(path))  # float data: the loader's checks
    except (OSError, ValueError) as e:
        raise InputError(f"data: cannot read {path}: {e}") from None
    if len(x) != len(y):
        raise InputError(f"data: {len(x)} images but {len(y)} labels in {path}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    return ArrayDataset(xt, torch.from_numpy(np.asarray(y, dtype=np.int64).reshape(-1)), names)
