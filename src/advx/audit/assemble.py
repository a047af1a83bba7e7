"""Assembling the report: the cascade's per-sample state, the findings and the eps curve, made
into a :class:`~advx.audit.report.Report`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._distributed import Group
from .._provenance import now, provenance
from ..attacks import Attack
from ..data.sources import Source
from ..threat import ThreatModel
from ._codec import decode
from .checks import Finding
from .report import (
    ClassRow,
    DataInfo,
    EpsCurve,
    Example,
    Gate,
    ModelInfo,
    Provenance,
    Report,
    Samples,
    Seconds,
    Stage,
    SuiteInfo,
    ThreatInfo,
    Totals,
    image_uri,
)
from .runner import CascadeState
from .stats import LEVEL, wilson
from .suites import Suite

__all__ = ["build_report"]

# meta keys that name the model, the data and the weights; every other one goes to provenance
_DESCRIBED = ("model", "data", "weights", "weights_sha256")


def build_report(
    model,
    source: Source,
    y: Tensor,
    threat: ThreatModel,
    suite: Suite,
    stages: Sequence[Attack],
    st: CascadeState,
    findings: list[Finding],
    curve: EpsCurve | None,
    *,
    device: torch.device,
    seed: int,
    shard: Group,
    closest: Sequence[float | None],
    fingerprint: dict[str, Any],
    n_examples: int,
    meta: dict[str, Any],
    seconds: Seconds,
) -> Report:
    """The report of a finished cascade over all N samples of ``source`` (labels ``y``)."""
    queries, grads = int(st.queries.sum()), int(st.grads.sum())
    n_robust = max(1, int(st.robust.sum()))
    return Report(
        created=now(),
        model=ModelInfo(
            name=repr(model),
            sha256=fingerprint["model"],
            weights=meta.get("weights"),
            weights_sha256=meta.get("weights_sha256"),
            name_given=meta.get("model"),
        ),
        data=DataInfo(name=meta.get("data"), n=st.n, sha256=fingerprint["data"]),
        threat=ThreatInfo(**threat.to_dict()),
        suite=SuiteInfo(**suite.to_dict()),
        clean_accuracy=float(st.clean_correct.float().mean()),
        robust_accuracy=float(st.robust.float().mean()),
        clean_accuracy_ci=wilson(int(st.clean_correct.sum()), st.n),
        robust_accuracy_ci=wilson(int(st.robust.sum()), st.n),
        ci_level=LEVEL,
        reliable=not any(f.severity == "error" for f in findings),
        cascade=_cascade(stages, st, closest),
        per_class=_per_class(y.cpu(), st),
        eps_curve=curve,
        samples=Samples(
            label=y.cpu().tolist(),
            clean_pred=st.clean_pred.tolist(),
            clean_correct=st.clean_correct.tolist(),
            robust=st.robust.tolist(),
            broken_by=st.broken_by.tolist(),
            distance=[None if math.isnan(v) else round(v, 6) for v in st.distance.tolist()],
            queries=st.queries.sum(dim=0).tolist(),  # (K + 1, N) -> (N,)
            grads=st.grads.sum(dim=0).tolist(),
        ),
        totals=Totals(
            queries=queries,
            grads=grads,
            queries_per_robust_point=round(queries / n_robust, 1),
            grads_per_robust_point=round(grads / n_robust, 1),
            seconds=seconds,
        ),
        findings=list(findings),
        examples=_examples(model, source, y, st, stages, n_examples, device),
        provenance=decode(
            Provenance,
            provenance(
                device=device,
                seed=seed,
                processes=shard.world,
                **{k: v for k, v in meta.items() if k not in _DESCRIBED},
            ),
            "provenance",
        ),
    )


def _cascade(
    stages: Sequence[Attack], st: CascadeState, closest: Sequence[float | None]
) -> list[Stage]:
    rows = []
    correct = st.clean_correct
    for k, a in enumerate(stages):
        broken_upto = correct & (st.broken_by >= 0) & (st.broken_by <= k)
        gate, threshold, share = None, float(st.gate[k]), closest[k]
        if not math.isnan(threshold) and share is not None:  # gated: which samples it ran on
            gate = Gate(
                closest=share,
                margin_at_most=threshold,
                attacked=int((st.queries[k + 1] > 0).sum()),
            )
        rows.append(
            Stage(
                stage=k,
                attack=a.name,
                params=_jsonable(a.params),
                broke=int((st.broken_by == k).sum()),
                robust_accuracy_after=float((correct & ~broken_upto).float().mean()),
                robust_accuracy_after_ci=wilson(int((correct & ~broken_upto).sum()), st.n),
                queries=int(st.queries[k + 1].sum()),
                grads=int(st.grads[k + 1].sum()),
                seconds=round(float(st.seconds[k + 1]), 3),
                gate=gate,
            )
        )
    return rows


def _per_class(y: Tensor, st: CascadeState) -> list[ClassRow]:
    classes = int(max(int(y.max()), int(st.clean_pred.max()))) + 1
    rows = []
    for c in range(classes):
        m = y == c
        n = int(m.sum())
        if n == 0:
            continue
        rows.append(
            ClassRow(
                label=c,
                n=n,
                clean_accuracy=float(st.clean_correct[m].float().mean()),
                robust_accuracy=float(st.robust[m].float().mean()),
                clean_accuracy_ci=wilson(int(st.clean_correct[m].sum()), n),
                robust_accuracy_ci=wilson(int(st.robust[m].sum()), n),
            )
        )
    return rows


def _examples(
    model,
    source: Source,
    y: Tensor,
    st: CascadeState,
    stages: Sequence[Attack],
    k: int,
    device: torch.device,
) -> list[Example]:
    """A few broken samples, with their images as 8-bit PNGs (for the report's page)."""
    rows = (st.broken_by >= 0).nonzero().view(-1)[:k]
    if rows.numel() == 0 or st.store is None:
        return []
    lo, hi = model.bounds
    xa = st.x_adv(rows)
    if xa.dim() != 4 or xa.shape[1] not in (1, 3):
        return []  # not greyscale or RGB images (C, H, W): nothing to show as a picture
    clean, _ = source.take(rows)
    with torch.no_grad():
        pred = model(xa.to(device)).argmax(1).cpu()

    def to8(t: Tensor) -> str:
        return image_uri(((t.float() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8))

    return [
        Example(
            index=r,
            label=int(y[r]),
            adversarial_label=int(pred[i]),
            attack=stages[int(st.broken_by[r])].name,
            distance=float(st.distance[r]),
            clean=to8(clean[i].cpu()),
            adversarial=to8(xa[i]),
        )
        for i, r in enumerate(rows.tolist())
    ]


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=repr))
