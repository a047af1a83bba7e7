"""The adversarial examples an audit found, kept: every one, losslessly, with what it is.

``audit(..., return_adv=True)`` puts them on ``report.adversarial``; ``advx audit --save-adv
FILE.npz`` writes them. Loading the file back and classifying ``x_adv`` gives the report's
per-sample verdicts: each listed sample is misclassified at its ``x_adv``, and the samples not
listed are exactly the robust ones and the ones already misclassified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_open
from ..errors import InputError

__all__ = ["AdversarialExamples", "FORMAT"]

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
    """

    index: Tensor
    x_adv: Tensor
    label: Tensor
    pred: Tensor
    stage: Tensor
    distance: Tensor
    attacks: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

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
        with atomic_open(path, "wb") as f:
            np.savez_compressed(
                f,
                index=self.index.cpu().numpy(),
                x_adv=x.numpy(),
                label=self.label.cpu().numpy(),
                pred=self.pred.cpu().numpy(),
                stage=self.stage.cpu().numpy(),
                distance=self.distance.cpu().numpy(),
                attacks=np.array(self.attacks, dtype=str),
                meta=np.array(json.dumps({"format": FORMAT, "dtype": dtype, **self.meta})),
            )
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
            )
        except (KeyError, AttributeError, json.JSONDecodeError):
            raise InputError(
                f"adversarial examples: {path} is not an {FORMAT} file (advx audit --save-adv)"
            ) from None


def collect(
    model,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    broken_by: Tensor,
    distance: Tensor,
    attacks: Sequence[str],
    *,
    meta: dict[str, Any],
    batch_size: int = 500,
) -> AdversarialExamples:
    """The examples of the samples the cascade broke (``broken_by >= 0``), with the model's
    prediction at each (one forward pass over them, not charged to the audit's counts)."""
    rows = (broken_by >= 0).nonzero().view(-1)
    xa = x_adv[rows]
    preds = []
    with torch.no_grad(), model.prepared():  # labels: a label-only model answers too
        for b in range(0, rows.numel(), batch_size):
            preds.append(model.labels(xa[b : b + batch_size].to(x.device)).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return AdversarialExamples(
        index=rows.clone(),
        x_adv=xa.clone(),
        label=y.cpu()[rows].clone(),
        pred=pred,
        stage=broken_by[rows].clone(),
        distance=distance[rows].clone(),
        attacks=list(attacks),
        meta=meta,
    )
