"""The audit, end to end: check the inputs, run the cascade (sharded under torchrun), the
sanity checks and the eps curve, and assemble the report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._distributed import current_group
from .._validate import check_classes, check_images, check_labels
from ..attacks import Attack
from ..data import data_sha256
from ..errors import InputError
from ..models.classifier import as_model
from ..threat import ThreatModel
from ._codec import decode
from .adversarial import collect
from .assemble import build_report
from .checks import Finding, check_blackbox_gain, check_convergence, check_curve, check_model
from .eps_curve import _eps_curve
from .report import EpsCurve, Report, Seconds, stage_labels
from .runner import CascadeState, gather_states, run_cascade
from .stats import count_of, wilson
from .suites import Suite, load_suite

__all__ = ["audit"]


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
    return_adv: bool = False,
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
        meta: extra provenance to record: ``model`` and ``data`` name them in the report,
            ``weights`` and ``weights_sha256`` the weights file; other keys go to provenance.
        state_mismatch: what to do with a state file made for another model, data or
            configuration: ``"error"`` (say which differs) or ``"restart"`` (overwrite it).
        return_adv: keep every adversarial example the cascade found on
            ``report.adversarial`` (an :class:`AdversarialExamples`: indices, inputs, labels,
            predictions, the stage that found each; ``.save("adv.npz")`` writes it losslessly).

    Under ``torchrun`` the samples are split across the processes and rank 0 returns the
    report of all of them; the other ranks return None.
    """
    started = time.perf_counter()
    model = as_model(model)
    x, y, threat = _checked(model, x, y, threat)
    n = x.shape[0]
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
        curve = decode(
            EpsCurve,
            _eps_curve(model, x, y, threat, eps_curve, full, seed=seed, subset=subset),
            "eps_curve",
        )
        curve = replace(
            curve,
            robust_accuracy_ci=[
                wilson(count_of(a, curve.n), curve.n) for a in curve.robust_accuracy
            ],
        )
        t_curve = time.perf_counter() - t0
        if checks and curve.check:
            findings += check_curve(
                curve.eps,
                curve.robust_accuracy,
                n=curve.n,
                large=curve.large_eps,
                acc_large=curve.robust_accuracy_large_eps,
            )
    if checks:
        t0 = time.perf_counter()
        findings += _after_cascade(model, x, y, threat, stages, full, seed=seed, subset=subset)
        t_checks += time.perf_counter() - t0

    report = build_report(
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
        seconds=Seconds(
            cascade=round(t_cascade, 3),
            checks=round(t_checks, 3),
            eps_curve=round(t_curve, 3),
            total=round(time.perf_counter() - started, 3),
        ),
    )
    if return_adv:
        adv = collect(
            model,
            x,
            y,
            full.x_adv,
            full.broken_by,
            full.distance,
            stage_labels(report.cascade),
            meta={
                "threat": threat.to_dict(),
                "data_sha256": fingerprint["data"],
                "model_sha256": fingerprint["model"],
                "suite": the_suite.name,
                "n": n,
            },
            batch_size=batch_size,
        )
        report = replace(report, adversarial=adv)
    return report


def _checked(model, x: Tensor, y: Tensor, threat: ThreatModel):
    """The inputs, checked against the model, and the threat with the model's bounds."""
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
    return x, y, threat


def _after_cascade(
    model,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    stages: list[Attack],
    full: CascadeState,
    *,
    seed: int,
    subset: int,
) -> list[Finding]:
    """The checks that read the cascade's outcome: black-box stages beating white-box ones,
    and a much longer attack on (some of) the points it left robust."""
    ran_on = [int((full.queries[k + 1] > 0).sum()) for k in range(len(stages))]
    findings = check_blackbox_gain(full.broken_by, stages, full.clean_correct, ran_on)
    robust_rows = full.robust.nonzero().view(-1)[: max(1, subset // 4)]
    if robust_rows.numel() and model.access == "gradients":
        white = [a.params.get("steps", 0) or 0 for a in stages if a.access == "gradients"]
        steps = 4 * max(white, default=0) or 400  # 400 when no stage took gradients
        rd = robust_rows.to(x.device)
        findings += check_convergence(
            model, x[rd], y[rd], threat, robust_rows.to(x.device), steps=steps, seed=seed
        )
    return findings
