"""The audit, end to end: check the inputs, run the cascade (sharded under torchrun), the
sanity checks and the eps curve, and assemble the report."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._distributed import current_group
from .._validate import check_classes, check_images, check_labels
from ..attacks import Attack
from ..data.sources import Source, as_source, rows_view
from ..errors import InputError
from ..models.classifier import as_model
from ..threat import ThreatModel
from ._codec import decode
from .adversarial import collect
from .assemble import build_report
from .checks import Finding, check_blackbox_gain, check_convergence, check_curve, check_model
from .eps_curve import _eps_curve
from .report import EpsCurve, Report, Seconds, stage_labels
from .runner import UNIT, CascadeState, gather_states, run_cascade, unit_size
from .stats import count_of, wilson
from .suites import Suite, load_suite

__all__ = ["audit"]


def audit(
    model,
    x: Any,
    y: Tensor | ThreatModel | None = None,
    threat: ThreatModel | None = None,
    *,
    suite: str | Path | Suite | Sequence = "standard",
    seed: int = 0,
    eps_curve: Sequence[float] | str | None = "auto",
    checks: bool = True,
    state: str | os.PathLike | None = None,
    batch_size: int | None = None,
    subset: int = 200,
    n_examples: int = 8,
    meta: dict[str, Any] | None = None,
    state_mismatch: str = "error",
    return_adv: bool = False,
    save_adv: str | os.PathLike | None = None,
    keys: tuple[Any, Any] | None = None,
    batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
) -> Report | None:
    """Measure robust accuracy against ``threat`` with a cascade of attacks.

    The data: ``audit(model, x, y, threat)`` with tensors, or ``audit(model, data, threat)``
    with a ``torch.utils.data.Dataset``, a ``DataLoader`` (``shuffle=False``) or a list of
    ``(x, y)`` batches. Data may stay on the CPU (or on disk) while the model runs on a GPU: it
    is read chunk by chunk and each chunk moves when it is attacked, so memory holds the model,
    a few chunks and per-sample numbers, whatever the number of samples. Per-sample results are
    the same whichever form and batch size the samples come in.

    Args:
        suite: ``"standard"`` (AutoAttack's recipe), ``"fast"`` (advx's cheaper cascade), a path
            to a TOML suite, or a list of attacks.
        eps_curve: ``"auto"`` (mixed: below eps from one minimum-norm FMN run's distances, at
            eps the cascade's verdict, above it APGD-CE per eps on the samples still robust,
            and at an eps that allows any input), ``"runs"`` (APGD-CE at every eps),
            ``"min-norm"`` (FMN at every eps), a list of eps values, or None to skip.
        checks: run the sanity checks (randomized model, probabilities, dead gradients,
            black-box beating white-box, curve shape, convergence).
        state: a file for per-sample state: written as the audit goes, resumed from when it
            exists (and refused if it was made for another model, data or configuration). The
            adversarial examples found go to ``state + ".adv"`` beside it.
        batch_size: samples per unit of work (and of saved state); None: 500 on a CPU, on a GPU
            as many as its free memory holds for the attacks' state (up to 10,000). Results do
            not depend on it.
        subset: how many samples the checks and the curve use (the cascade uses all).
        meta: extra provenance to record: ``model`` and ``data`` name them in the report,
            ``weights`` and ``weights_sha256`` the weights file; other keys go to provenance.
        state_mismatch: what to do with a state file made for another model, data or
            configuration: ``"error"`` (say which differs) or ``"restart"`` (overwrite it).
        return_adv: keep every adversarial example the cascade found on
            ``report.adversarial`` (an :class:`AdversarialExamples`: indices, inputs, labels,
            predictions, the stage that found each; ``.save("adv.npz")`` writes it losslessly).
        save_adv: write them to this ``.npz`` instead, streamed (never all in memory).
        keys: which entries of a dict or tuple batch hold the images and the labels, e.g.
            ``("image", "label")`` or ``(0, 1)``; ``batch_fn`` maps a batch to ``(x, y)``.

    8-bit images from a Dataset or DataLoader are scaled into [0, 1] (with a warning), one-hot
    labels made into class indices (with a warning).

    Under ``torchrun`` the samples are split across the processes and rank 0 returns the
    report of all of them; the other ranks return None.
    """
    started = time.perf_counter()
    if isinstance(y, ThreatModel) and threat is None:
        y, threat = None, y  # audit(model, loader, threat)
    model = as_model(model)
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise InputError(
            f"batch_size: expected a positive int (or None: sized for the device), got "
            f"{batch_size!r}"
        )
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        x, y, threat = _checked(model, x, y, threat)
        source = as_source(x, y, bounds=model.bounds)
        device = x.device
    else:
        threat = _threat(model, threat)
        source = as_source(x, y, keys=keys, batch_fn=batch_fn, bounds=model.bounds)
        device = _model_device(model)
    the_suite = load_suite(suite, threat)
    staged = the_suite.stages(threat, seed=seed)
    stages, closest = [a for a, _ in staged], [c for _, c in staged]
    scan = source.scan(batch_size or UNIT)  # count, check, fingerprint: one pass, before work
    n, y_all = scan.n, check_labels(scan.y, scan.n, torch.device("cpu"))
    if batch_size is None:
        batch_size = unit_size(device, scan.shape, scan.dtype)

    fingerprint = {
        "model": model.fingerprint(),
        "data": scan.sha256,
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

    def take(r: Tensor) -> tuple[Tensor, Tensor]:
        xs, _ = source.take(r, batch_size=batch_size)
        return xs.to(device), y_all[r].to(device)

    findings: list[Finding] = []
    t_checks = 0.0
    head: tuple[Tensor, Tensor] | None = None
    if shard.rank == 0 and (checks or eps_curve not in (None, False)):
        head = take(torch.arange(min(subset, n)))  # the first samples: the checks' and curve's
    if checks and shard.rank == 0 and head is not None:
        t0 = time.perf_counter()
        findings += check_model(model, *head)
        t_checks += time.perf_counter() - t0

    t0 = time.perf_counter()
    part = run_cascade(
        model,
        source if shard.world == 1 else rows_view(source, rows),
        y_all[rows],
        stages,
        index=rows,
        state_path=state_path,
        fingerprint={**fingerprint, "shard": f"{shard.rank}/{shard.world}"},
        batch_size=batch_size,
        desc=f"audit {the_suite.name}"
        + (f" [{shard.rank}/{shard.world}]" if shard.world > 1 else ""),
        mismatch=state_mismatch,
        closest=closest,
        device=device,
    )
    full = gather_states(part, shard, n)
    t_cascade = time.perf_counter() - t0
    if full is None:
        return None
    try:
        return _finish(
            model,
            source,
            y_all,
            threat,
            the_suite,
            stages,
            closest,
            full,
            findings,
            head,
            take,
            fingerprint=fingerprint,
            device=device,
            seed=seed,
            subset=subset,
            checks=checks,
            eps_curve=eps_curve,
            shard=shard,
            n_examples=n_examples,
            meta=meta or {},
            batch_size=batch_size,
            return_adv=return_adv,
            save_adv=save_adv,
            times=(started, t_cascade, t_checks),
        )
    finally:
        if full.store is not None:
            full.store.close()
        if part is not full and part.store is not None:
            part.store.close()


def _finish(
    model,
    source: Source,
    y: Tensor,
    threat: ThreatModel,
    the_suite: Suite,
    stages: list[Attack],
    closest: list[float | None],
    full: CascadeState,
    findings: list[Finding],
    head: tuple[Tensor, Tensor] | None,
    take: Callable[[Tensor], tuple[Tensor, Tensor]],
    *,
    fingerprint: dict[str, Any],
    device: torch.device,
    seed: int,
    subset: int,
    checks: bool,
    eps_curve,
    shard,
    n_examples: int,
    meta: dict[str, Any],
    batch_size: int,
    return_adv: bool,
    save_adv,
    times: tuple[float, float, float],
) -> Report:
    """The eps curve, the checks that read the cascade, the report and the examples."""
    started, t_cascade, t_checks = times
    n = full.n
    if getattr(model, "num_classes", None):
        check_classes(y, model.num_classes)
    curve, t_curve = None, 0.0
    if eps_curve is not None and eps_curve is not False and head is not None:
        t0 = time.perf_counter()
        curve = decode(
            EpsCurve,
            _eps_curve(model, head[0], head[1], threat, eps_curve, full, seed=seed, subset=subset),
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
                eps0=float(threat.eps),
                beyond=curve.broken_beyond_cascade,
            )
    if checks:
        t0 = time.perf_counter()
        findings += _after_cascade(model, take, threat, stages, full, seed=seed, subset=subset)
        t_checks += time.perf_counter() - t0

    report = build_report(
        model,
        source,
        y,
        threat,
        the_suite,
        stages,
        full,
        findings,
        curve,
        device=device,
        seed=seed,
        shard=shard,
        closest=closest,
        fingerprint=fingerprint,
        n_examples=n_examples,
        meta=meta,
        seconds=Seconds(
            cascade=round(t_cascade, 3),
            checks=round(t_checks, 3),
            eps_curve=round(t_curve, 3),
            total=round(time.perf_counter() - started, 3),
        ),
    )
    if return_adv or save_adv is not None:
        adv = collect(
            model,
            full,
            y,
            stage_labels(report.cascade),
            meta={
                "threat": threat.to_dict(),
                "data_sha256": fingerprint["data"],
                "model_sha256": fingerprint["model"],
                "suite": the_suite.name,
                "n": n,
            },
            device=device,
            batch_size=batch_size,
            names=source.names,
            save_to=save_adv,
            keep=return_adv,
        )
        if return_adv:
            report = replace(report, adversarial=adv)
    return report


def _threat(model, threat) -> ThreatModel:
    """The threat, checked, with the model's bounds."""
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat: expected a ThreatModel such as advx.Linf(0.3), got {threat!r}")
    if threat.per_sample or threat.unbounded:
        raise InputError("threat: an audit needs one finite eps for all samples")
    threat = threat.with_bounds(model.bounds) if not threat.has_explicit_bounds else threat
    if threat.bounds != tuple(model.bounds):
        raise InputError(
            f"threat: its bounds {threat.bounds} differ from the model's {model.bounds}"
        )
    return threat


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


def _checked(model, x: Tensor, y: Tensor, threat):
    """The inputs, checked against the model, and the threat with the model's bounds."""
    threat = _threat(model, threat)
    x = check_images(x, model.bounds)
    model.check_input(x)
    n = x.shape[0]
    if n == 0:
        raise InputError("x: no samples to audit")
    y = check_labels(y, n, x.device)
    return x, y, threat


def _after_cascade(
    model,
    take: Callable[[Tensor], tuple[Tensor, Tensor]],
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
        xr, yr = take(robust_rows)
        findings += check_convergence(
            model, xr, yr, threat, robust_rows.to(xr.device), steps=steps, seed=seed
        )
    return findings
