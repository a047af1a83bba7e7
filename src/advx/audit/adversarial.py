"""The adversarial examples an audit found, kept: every one, losslessly, with what it is.

``audit(..., return_adv=True)`` puts them on ``report.adversarial``; ``advx audit --save-adv
FILE.npz`` writes them. Loading the file back and classifying ``x_adv`` gives the report's
per-sample verdicts: each listed sample is misclassified at its ``x_adv``, and the samples not
listed are exactly the robust ones and the ones already misclassified.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_open
from ..errors import InputError

__all__ = ["AdversarialExamples", "AdvStore", "FORMAT"]

FORMAT = "advx-adversarial/1"


@dataclass(frozen=True, eq=False)
class AdversarialExamples:
    """The broken samples of an audit (M of its N), in the order of their indices.

    Attributes:
        index: int64 (M,) each example's position in the audited data.
        x_adv: (M, ...) the adversarial inputs, in the dtype the audit ran in.
        label: int64 (M,) the true labels.
        pred: int64 (M,) the model's prediction at ``x_adv``.
        stage: int64 (M,) the cascade stage that found it (``attacks[stage]`` names it).
        distance: float64 (M,) its distance to the clean input in the threat's norm.
        attacks: the name of each stage, in order.
        meta: the threat, the data's and the model's sha256, the suite's name.
        names: each example's file (or other name) where the data had names (an image folder,
            CIFAR-10's batches), else None.
    """

    index: Tensor
    x_adv: Tensor
    label: Tensor
    pred: Tensor
    stage: Tensor
    distance: Tensor
    attacks: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.index.numel())

    def __repr__(self) -> str:
        shape = tuple(self.x_adv.shape[1:])
        return f"AdversarialExamples({len(self)} examples of shape {shape}, {self.x_adv.dtype})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write an uncompressed-precision ``.npz`` atomically (``np.load`` reads it; so does
        :meth:`load`). bfloat16 inputs are stored as float32, which holds them exactly."""
        path = Path(path)
        x = self.x_adv.detach().cpu()
        dtype = str(x.dtype).removeprefix("torch.")
        if x.dtype == torch.bfloat16:
            x = x.float()
        arrays: dict[str, Any] = {
            "index": self.index.cpu().numpy(),
            "x_adv": x.numpy(),
            "label": self.label.cpu().numpy(),
            "pred": self.pred.cpu().numpy(),
            "stage": self.stage.cpu().numpy(),
            "distance": self.distance.cpu().numpy(),
            "attacks": np.array(self.attacks, dtype=str),
            "meta": np.array(json.dumps({"format": FORMAT, "dtype": dtype, **self.meta})),
        }
        if self.names is not None:
            arrays["names"] = np.array(self.names, dtype=str)
        with atomic_open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdversarialExamples:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise InputError(f"adversarial examples: cannot read {path} ({e})") from None
        try:
            meta = json.loads(str(arrays.pop("meta")))
            if meta.pop("format", None) != FORMAT:
                raise KeyError("format")
            dtype = getattr(torch, meta.pop("dtype"))
            return cls(
                index=torch.from_numpy(arrays["index"]),
                x_adv=torch.from_numpy(arrays["x_adv"]).to(dtype),
                label=torch.from_numpy(arrays["label"]),
                pred=torch.from_numpy(arrays["pred"]),
                stage=torch.from_numpy(arrays["stage"]),
                distance=torch.from_numpy(arrays["distance"]),
                attacks=[str(a) for a in arrays["attacks"].tolist()],
                meta=meta,
                names=[str(v) for v in arrays["names"].tolist()] if "names" in arrays else None,
            )
        except (KeyError, AttributeError, json.JSONDecodeError):
            raise InputError(
                f"adversarial examples: {path} is not an {FORMAT} file (advx audit --save-adv)"
            ) from None


def collect(
    model,
    state,
    y: Tensor,
    attacks: Sequence[str],
    *,
    meta: dict[str, Any],
    device: torch.device,
    batch_size: int = 500,
    names: Sequence[str] | None = None,
    save_to: str | os.PathLike | None = None,
    keep: bool = True,
) -> AdversarialExamples | None:
    """The examples of the samples the cascade broke (``state.broken_by >= 0``), read back from
    the state's file chunk by chunk, with the model's prediction at each (one forward pass over
    them, not charged to the audit's counts).

    ``save_to``: stream them into that ``.npz`` (what :meth:`AdversarialExamples.save` writes,
    never all in memory). ``keep``: also return them, in memory.
    """
    rows = (state.broken_by >= 0).nonzero().view(-1)
    m = rows.numel()
    stored = torch.float32 if state.store.dtype == torch.bfloat16 else state.store.dtype
    writer = _NpzStream(save_to, (m, *state.store.shape), stored) if save_to is not None else None
    kept, preds = [], []
    try:
        with torch.no_grad(), model.prepared():  # labels: a label-only model answers too
            for b in range(0, m, batch_size):
                xa = state.x_adv(rows[b : b + batch_size])
                preds.append(model.labels(xa.to(device)).cpu())
                if writer is not None:
                    writer.write_rows(xa.to(stored))
                if keep:
                    kept.append(xa)
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        adv = AdversarialExamples(
            index=rows.clone(),
            x_adv=torch.cat(kept) if kept else torch.zeros((0, *state.store.shape)),
            label=y.cpu()[rows].clone(),
            pred=pred,
            stage=state.broken_by[rows].clone(),
            distance=state.distance[rows].clone(),
            attacks=list(attacks),
            meta=meta,
            names=[names[i] for i in rows.tolist()] if names is not None else None,
        )
        if writer is not None:
            writer.finish(adv, dtype=str(state.store.dtype).removeprefix("torch."))
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return adv if keep else None


class _NpzStream:
    """An ``.npz`` whose ``x_adv`` is written in pieces (zip64, deflated), the small arrays
    after; written to a temporary name and renamed into place when whole."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype):
        import zipfile

        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._zip = zipfile.ZipFile(
            self._tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True
        )
        self._entry = self._zip.open("x_adv.npy", "w", force_zip64=True)
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        header = {
            "descr": np.lib.format.dtype_to_descr(np_dtype),
            "fortran_order": False,
            "shape": tuple(int(s) for s in shape),
        }
        np.lib.format.write_array_header_2_0(self._entry, header)

    def write_rows(self, x: Tensor) -> None:
        self._entry.write(x.contiguous().numpy().tobytes())

    def finish(self, adv: AdversarialExamples, *, dtype: str) -> None:
        self._entry.close()
        arrays: dict[str, np.ndarray] = {
            "index": adv.index.numpy(),
            "label": adv.label.numpy(),
            "pred": adv.pred.numpy(),
            "stage": adv.stage.numpy(),
            "distance": adv.distance.numpy(),
            "attacks": np.array(adv.attacks, dtype=str),
            "meta": np.array(json.dumps({"format": FORMAT, "dtype": dtype, **adv.meta})),
        }
        if adv.names is not None:
            arrays["names"] = np.array(adv.names, dtype=str)
        for name, a in arrays.items():
            with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
        self._zip.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._entry.close()
            self._zip.close()
        finally:
            self._tmp.unlink(missing_ok=True)


class AdvStore:
    """Adversarial examples written as they are found: an append-only file of raw rows, so an
    audit's memory does not grow with the number it finds.

    ``path`` None: an anonymous temporary file (gone when closed). A path is kept beside the
    resume state; ``count`` is how many records that state accounts for, and anything written
    after it (a run killed between a unit and its state) is cut off.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        count: int = 0,
    ) -> None:
        self.path, self.shape, self.dtype = path, tuple(shape), dtype
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * _itemsize(dtype)
        if path is None:
            self._f = tempfile.TemporaryFile()
        else:
            have = path.stat().st_size if path.exists() else 0
            if have < count * self.row_bytes:
                raise InputError(
                    f"resume: the adversarial-examples file {path} holds fewer examples than the "
                    "state file says; delete the state file to start afresh"
                )
            self._f = open(path, "r+b" if path.exists() else "w+b")  # held open
            self._f.truncate(count * self.row_bytes)
        self.count = count
        self._f.seek(count * self.row_bytes)
        # closed when the store is dropped (a state returned by run_cascade, an interrupted audit)
        weakref.finalize(self, self._f.close)

    def append(self, x: Tensor) -> Tensor:
        """Write rows (M, *shape); returns their slots (int64 (M,))."""
        x = x.detach().to("cpu", self.dtype).contiguous()
        if tuple(x.shape[1:]) != self.shape:
            raise InputError(
                f"adversarial examples of shape {tuple(x.shape[1:])}, expected {self.shape}"
            )
        self._f.seek(self.count * self.row_bytes)
        self._f.write(x.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's bytes: no copy
        slots = torch.arange(self.count, self.count + x.shape[0])
        self.count += x.shape[0]
        return slots

    def read(self, slots: Tensor) -> Tensor:
        """The rows at ``slots`` (each >= 0), in that order."""
        slots = slots.cpu().long()
        if bool((slots < 0).any()) or bool((slots >= self.count).any()):
            raise IndexError("slot out of range")
        self._f.flush()
        fd = self._f.fileno()
        buf = bytearray(slots.numel() * self.row_bytes)
        view = memoryview(buf)
        for i, s in enumerate(slots.tolist()):  # one pread per row: no mapping stays resident
            view[i * self.row_bytes : (i + 1) * self.row_bytes] = os.pread(
                fd, self.row_bytes, s * self.row_bytes
            )
        out = torch.frombuffer(buf, dtype=self.dtype) if buf else torch.zeros(0, dtype=self.dtype)
        return out.reshape(slots.numel(), *self.shape)

    def flush(self) -> None:
        self._f.flush()
        if self.path is not None:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
