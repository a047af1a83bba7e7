"""The robustness audit: a cascade of attacks, sanity checks, an eps curve, and a report.

report = advx.audit(model, x, y, advx.Linf(0.3), suite="standard")
report.robust_accuracy, report.findings
report.save("report.json"); report.save_html("report.html")
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import attacks
from .._distributed import Group, current_group
from .._provenance import now, provenance
from .._rng import derive_seed
from .._validate import check_classes, check_images, check_labels
from ..data import data_sha256
from ..errors import InputError
from ..models.classifier import as_model
from ..threat import ThreatModel
from .checks import (
    Finding,
    check_blackbox_gain,
    check_convergence,
    check_curve,
    check_model,
    large_eps,
)
from .report import SCHEMA, Report
from .runner import (
    CascadeState,
    gather_states,
    run_cascade,
)
from .suites import SUITES, Suite, load_suite

__all__ = ["audit", "Report", "Suite", "SUITES", "load_suite", "Finding"]

_DEFAULT_CURVE = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def audit(
    model,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    suite: str | Path | Suite | Sequence = "standard",
    seed: int = 0,
    eps_curve: Sequence[float] | str | None = "auto",
    checks: bool = True,
    state: str | os.PathLike | None = None,
    batch_size: int = 500,
    subset: int = 200,
    n_examples: int = 8,
    meta: dict[str, Any] | None = None,
    state_mismatch: str = "error",
) -> Report | None:
    """Measure robust accuracy against ``threat`` with a cascade of attacks.

    Args:
        suite: ``"standard"`` (AutoAttack's recipe), ``"fast"`` (advx's cheaper cascade), a path
            to a TOML suite, or a list of attacks.
        eps_curve: ``"auto"`` (robust accuracy of APGD-CE at 0.25..2 x eps, and at an eps that
            allows any input), a list of eps values, ``"min-norm"`` (from a minimum-norm
            attack's per-sample distances), or None to skip.
        checks: run the sanity checks (randomized model, probabilities, dead gradients,
            black-box beating white-box, curve shape, convergence).
        state: a file for per-sample state: written as the audit goes, resumed from when it
            exists (and refused if it was made for another model, data or configuration).
        subset: how many samples the checks and the curve use (the cascade uses all).
        meta: extra provenance to record (e.g. the weights' path and sha256).
        state_mismatch: what to do with a state file made for another model, data or
            configuration: ``"error"`` (say which differs) or ``"restart"`` (overwrite it).

    Under ``torchrun`` the samples are split across the processes and rank 0 returns the
    report of all of them; the other ranks return None.
    """
    started = time.perf_counter()
    model = as_model(model)
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat: expected a ThreatModel such as advx.Linf(0.3), got {threat!r}")
    if threat.per_sample or threat.unbounded:
        raise InputError("threat: an audit needs one finite eps for all samples")
    x = check_images(x, model.bounds)
    model.check_input(x)
    n = x.shape[0]
    if n == 0:
        raise InputError("x: no samples to audit")
    y = check_labels(y, n, x.device)
    threat = threat.with_bounds(model.bounds) if not threat.has_explicit_bounds else threat
    if threat.bounds != tuple(model.bounds):
        raise InputError(
            f"threat: its bounds {threat.bounds} differ from the model's {model.bounds}"
        )
    the_suite = load_suite(suite, threat)
    staged = the_suite.stages(threat, seed=seed)
    stages, closest = [a for a, _ in staged], [c for _, c in staged]
    if batch_size < 1:
        raise InputError(f"batch_size: expected a positive int, got {batch_size}")

    fingerprint = {
        "model": model.fingerprint(),
        "data": data_sha256(x, y),
        "suite": json.dumps(the_suite.to_dict(), sort_keys=True, default=str),
        "threat": json.dumps(threat.to_dict(), sort_keys=True),
        "seed": seed,
    }
    shard = current_group()
    rows = shard.shard(n)
    state_path = None
    if state is not None:
        state_path = (
            Path(state) if shard.world == 1 else Path(f"{state}.rank{shard.rank}-of-{shard.world}")
        )

    findings: list[Finding] = []
    t_checks = 0.0
    sub = torch.arange(min(subset, n))
    if checks and shard.rank == 0:
        t0 = time.perf_counter()
        findings += check_model(model, x[sub.to(x.device)], y[sub.to(x.device)])
        t_checks += time.perf_counter() - t0

    t0 = time.perf_counter()
    rows_dev = rows.to(x.device)
    part = run_cascade(
        model,
        x[rows_dev],
        y[rows_dev],
        stages,
        index=rows,
        state_path=state_path,
        fingerprint={**fingerprint, "shard": f"{shard.rank}/{shard.world}"},
        batch_size=batch_size,
        desc=f"audit {the_suite.name}"
        + (f" [{shard.rank}/{shard.world}]" if shard.world > 1 else ""),
        mismatch=state_mismatch,
        closest=closest,
    )
    full = gather_states(part, shard, n)
    t_cascade = time.perf_counter() - t0
    if full is None:
        return None

    if getattr(model, "num_classes", None):
        check_classes(y, model.num_classes)
    curve, t_curve = None, 0.0
    if eps_curve is not None and eps_curve is not False:
        t0 = time.perf_counter()
        curve = _eps_curve(model, x, y, threat, eps_curve, full, seed=seed, subset=subset)
        t_curve = time.perf_counter() - t0
        if checks and curve.get("check", True):
            findings += check_curve(
                curve["eps"],
                curve["robust_accuracy"],
                n=curve["n"],
                large=curve.get("large_eps"),
                acc_large=curve.get("robust_accuracy_large_eps"),
            )
    if checks:
        t0 = time.perf_counter()
        findings += check_blackbox_gain(full.broken_by, stages, full.clean_correct)
        robust_rows = full.robust.nonzero().view(-1)[: max(1, subset // 4)]
        if robust_rows.numel() and model.access == "gradients":
            steps = (
                4 * max((a.params.get("steps", 0) or 0) for a in stages if a.access == "gradients")
                or 400
            )
            rd = robust_rows.to(x.device)
            findings += check_convergence(
                model, x[rd], y[rd], threat, robust_rows.to(x.device), steps=steps, seed=seed
            )
        t_checks += time.perf_counter() - t0

    data = _document(
        model,
        x,
        y,
        threat,
        the_suite,
        stages,
        full,
        findings,
        curve,
        seed=seed,
        shard=shard,
        closest=closest,
        fingerprint=fingerprint,
        n_examples=n_examples,
        meta=meta or {},
        seconds={
            "cascade": round(t_cascade, 3),
            "checks": round(t_checks, 3),
            "eps_curve": round(t_curve, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    )
    return Report(data)


def _eps_curve(
    model, x, y, threat: ThreatModel, spec, full: CascadeState, *, seed: int, subset: int
) -> dict[str, Any]:
    """Robust accuracy against eps on the first ``subset`` samples."""
    eps0 = float(threat.eps)
    m = min(subset, x.shape[0])
    xs, ys = x[:m], y[:m]
    correct = full.clean_correct[:m].to(x.device)
    rows = correct.nonzero().view(-1)
    index = rows.clone()
    if spec == "min-norm":
        name = "fab" if "fab" in attacks.list_attacks(norm=threat.norm) else "cw"
        attack = attacks.create(name, threat.with_eps(math.inf), seed=derive_seed(seed, 7001))
        r = attack(model, xs[rows], ys[rows], index=index)
        dist = torch.full((m,), -1.0, dtype=torch.float64, device=x.device)
        dist[rows] = torch.where(
            r.success, r.distance.double(), torch.full_like(r.distance.double(), math.inf)
        )
        grid = [eps0 * f for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)]
        acc = [float((dist > e).float().mean()) for e in grid]
        return {
            "eps": grid,
            "robust_accuracy": acc,
            "n": m,
            "attack": name,
            "source": "minimum-norm",
            "check": False,
        }
    eps_list = [eps0 * f for f in _DEFAULT_CURVE] if spec == "auto" else [float(e) for e in spec]
    if any(e < 0 or not math.isfinite(e) for e in eps_list):
        raise InputError(f"eps_curve: expected finite eps values >= 0, got {eps_list}")
    eps_list = sorted(set(eps_list))
    name = "apgd" if "apgd" in attacks.list_attacks(norm=threat.norm) else "pgd"
    big = large_eps(threat, x)
    accs = []
    for k, e in enumerate(eps_list + [big]):
        if rows.numel() == 0:
            accs.append(0.0)
            continue
        attack = attacks.create(
            name, threat.with_eps(e), steps=50, seed=derive_seed(seed, 7000 + k)
        )
        r = attack(model, xs[rows], ys[rows], index=index)
        accs.append(float((~r.success).sum()) / m)
    return {
        "eps": eps_list,
        "robust_accuracy": accs[:-1],
        "n": m,
        "attack": f"{name} (50 steps)",
        "source": "runs",
        "large_eps": big,
        "robust_accuracy_large_eps": accs[-1],
    }


def _document(
    model,
    x,
    y,
    threat,
    suite,
    stages,
    st: CascadeState,
    findings,
    curve,
    *,
    seed,
    shard: Group,
    closest,
    fingerprint,
    n_examples,
    meta,
    seconds,
) -> dict[str, Any]:
    n = st.n
    correct = st.clean_correct
    robust = st.robust
    cascade = []
    for k, a in enumerate(stages):
        broken_upto = correct & (st.broken_by >= 0) & (st.broken_by <= k)
        cascade.append(
            {
                "stage": k,
                "attack": a.name,
                "params": _jsonable(a.params),
                "broke": int((st.broken_by == k).sum()),
                "robust_accuracy_after": float((correct & ~broken_upto).float().mean()),
                "queries": int(st.queries[k + 1].sum()),
                "grads": int(st.grads[k + 1].sum()),
                "seconds": round(float(st.seconds[k + 1]), 3),
            }
        )
        if not math.isnan(float(st.gate[k])):  # a gated stage: which samples it ran on
            cascade[-1]["gate"] = {
                "closest": closest[k],
                "margin_at_most": float(st.gate[k]),
                "attacked": int((st.queries[k + 1] > 0).sum()),
            }
    y_cpu = y.cpu()
    classes = int(max(int(y_cpu.max()), int(st.clean_pred.max()))) + 1
    per_class = []
    for c in range(classes):
        m = y_cpu == c
        if int(m.sum()) == 0:
            continue
        per_class.append(
            {
                "class": c,
                "n": int(m.sum()),
                "clean_accuracy": float(correct[m].float().mean()),
                "robust_accuracy": float(robust[m].float().mean()),
            }
        )
    queries = int(st.queries.sum())
    grads = int(st.grads.sum())
    n_robust = max(1, int(robust.sum()))
    examples = _examples(model, x, y, st, stages, n_examples)
    dist = st.distance
    return {
        "schema": SCHEMA,
        "created": now(),
        "model": {
            "name": repr(model),
            "sha256": fingerprint["model"],
            **{k: v for k, v in meta.items() if k.startswith("weights")},
            "name_given": meta.get("model"),
        },
        "data": {"name": meta.get("data"), "n": n, "sha256": fingerprint["data"]},
        "threat": threat.to_dict(),
        "suite": suite.to_dict(),
        "clean_accuracy": float(correct.float().mean()),
        "robust_accuracy": float(robust.float().mean()),
        "reliable": not any(f.severity == "error" for f in findings),
        "cascade": cascade,
        "per_class": per_class,
        "eps_curve": curve,
        "samples": {
            "label": y_cpu.tolist(),
            "clean_pred": st.clean_pred.tolist(),
            "clean_correct": correct.tolist(),
            "robust": robust.tolist(),
            "broken_by": st.broken_by.tolist(),
            "distance": [None if math.isnan(v) else round(v, 6) for v in dist.tolist()],
            "queries": st.queries.sum(dim=0).tolist(),
            "grads": st.grads.sum(dim=0).tolist(),
        },
        "totals": {
            "queries": queries,
            "grads": grads,
            "queries_per_robust_point": round(queries / n_robust, 1),
            "grads_per_robust_point": round(grads / n_robust, 1),
            "seconds": seconds,
        },
        "findings": [f.to_dict() for f in findings],
        "examples": examples,
        "provenance": provenance(
            device=x.device,
            seed=seed,
            processes=shard.world,
            **{
                k: v
                for k, v in meta.items()
                if not k.startswith("weights") and k not in ("model", "data")
            },
        ),
    }


def _examples(model, x, y, st: CascadeState, stages, k: int) -> list[dict[str, Any]]:
    """A few broken samples, with their images as 8-bit lists (for the report's grid)."""
    rows = (st.broken_by >= 0).nonzero().view(-1)[:k]
    if rows.numel() == 0:
        return []
    lo, hi = model.bounds
    xa = st.x_adv[rows]
    with torch.no_grad():
        pred = model(xa.to(x.device)).argmax(1).cpu()
    out = []
    for i, r in enumerate(rows.tolist()):
        to8 = lambda t: (
            ((t.float() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8).tolist()
        )
        out.append(
            {
                "index": r,
                "label": int(y[r]),
                "adversarial_label": int(pred[i]),
                "attack": stages[int(st.broken_by[r])].name,
                "distance": float(st.distance[r]),
                "clean": to8(x[r].cpu()),
                "adversarial": to8(xa[i]),
            }
        )
    return out


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=repr))
