"""The update loop: reviewed inputs back into a better model, promoted only when it is better.

>>> init("models/", model, data=(x_held, y_held))            # v0001: calibrated, current
>>> r = update("models/", reviewed="reviewed.npz", train_data="mnist-demo",
...            audit_data=(x_held, y_held), threat="linf:0.3")
>>> r.promoted, r.version, r.reason

One update, in order:

1. **Fine-tune** a copy of the current version on its training data mixed with the human-labelled
   inputs of ``advx review export``, adversarially (a recipe of :mod:`advx.training`, default
   FGSM with a random start). The reviewed items are few: they are repeated so that they make up
   ``review_share`` of the mix, else one epoch would barely see them.
2. **Audit** the old and the new model on the same held-out data, with the same cheap attack
   cascade and seed (:func:`advx.audit.audit`, PGD by default): clean and robust accuracy.
3. **Gate** -- the rule: the new model is promoted only when neither its robust accuracy nor its
   clean accuracy is lower than the old one's by more than ``max_drop`` (absolute, e.g. 0.01 =
   one point), and the audit found no reason to distrust its figures. A fine-tune on bad labels
   or one that trades robustness away is refused, and the old version keeps serving.
4. **Recalibrate** the guard's policy for the new weights (the same detectors, actions and
   targets as the current policy) on clean held-out data: thresholds are bound to the weights'
   fingerprint, so the old policy cannot be reused.
5. **Promote**: the version is written to the model directory (provenance: its parent, the
   sha256 of every data set used, both audits, the calibration) and made current only once it
   loads completely (:class:`~advx.guard.versions.ModelDir`). A running ``advx serve
   --model-dir`` picks it up on SIGHUP or ``POST /admin/reload``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._validate import check_float, check_int
from ..errors import InputError
from ..threat import ThreatModel, parse_threat
from .guard import Guard
from .policy import Policy
from .registry import build_detector, build_detectors
from .versions import ModelDir, ModelVersion

__all__ = ["UpdateResult", "update", "init", "DEFAULT_SUITE", "RULE"]

log = logging.getLogger(__name__)

# the gate's audit: cheap enough to run on every update, strong enough to see robustness traded
# away (a fine-tune that drops robustness drops it against PGD first)
DEFAULT_SUITE: tuple[dict[str, Any], ...] = ({"name": "pgd", "steps": 10},)
RULE = (
    "promote only when robust accuracy and clean accuracy are each at most max_drop below the "
    "current version's, on the same held-out data, attacks and seed"
)

Data = tuple[Tensor, Tensor] | str | os.PathLike


@dataclass(frozen=True)
class UpdateResult:
    """What an update did and why. ``old``/``new``: the audits' figures (``clean_accuracy``,
    ``robust_accuracy``, ``reviewed_accuracy``: on the reviewed items, ``reliable``).
    ``version``: the new version's name when one was written (only when promoted)."""

    promoted: bool
    reason: str
    parent: str
    version: str | None
    old: dict[str, Any]
    new: dict[str, Any]
    max_drop: float
    rule: str = RULE
    training: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    comparison: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The outcome for a person, one fact per line."""
        o, n = self.old, self.new
        out = [
            f"{'PROMOTED ' + str(self.version) if self.promoted else 'REFUSED'} "
            f"(current was {self.parent}): {self.reason}",
        ]
        for key in ("clean_accuracy", "robust_accuracy", "reviewed_accuracy"):
            if key in o and key in n:
                out.append(
                    f"  {key.replace('_', ' ')}: {o[key]:.4f} -> {n[key]:.4f} "
                    f"({n[key] - o[key]:+.4f})"
                )
        c = self.comparison
        if c:
            lo, hi = c["robust_delta_interval"]
            out.append(
                f"  robust accuracy change {c['robust_delta']:+.4f}, {c['interval_level']:.0%} "
                f"interval [{lo:+.4f}, {hi:+.4f}]; {c['newly_broken']} held-out samples newly "
                f"broken, {c['newly_robust']} newly robust"
            )
        t = self.training
        if t:
            out.append(
                f"  trained {t.get('epochs')} epoch(s) of {t.get('recipe')} on {t.get('n_train')} "
                f"training + {t.get('n_reviewed')} reviewed items (x{t.get('review_repeats')}) "
                f"in {t.get('seconds', 0):.1f} s"
            )
        if self.calibration:
            f = self.calibration.get("fpr", {})
            out.append(
                f"  recalibrated: false-positive rate {f.get('measured', float('nan')):.4f} "
                f"(target {f.get('target', float('nan')):g}), policy {self.calibration['hash']}"
            )
        out.append(f"  rule: {self.rule} (max_drop {self.max_drop:g})")
        return out


# ---- helpers ----------------------------------------------------------------------------------
def _data(value: Data, name: str) -> tuple[Tensor, Tensor]:
    from ..data import load

    if isinstance(value, (tuple, list)) and len(value) == 2:
        x, y = value
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InputError(f"{name}: expected (x, y) tensors, a data set name or a path")
        return x, y
    if isinstance(value, (str, os.PathLike)):
        try:
            return load(value)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
    raise InputError(
        f"{name}: expected (x, y) tensors, a data set name or a path, got {type(value).__name__}"
    )


def _review_ids(reviewed: Data) -> list[int] | None:
    """The review items' ids an ``advx review export`` file records (provenance), else None."""
    if not isinstance(reviewed, (str, os.PathLike)) or not str(reviewed).endswith(".npz"):
        return None
    import numpy as np

    try:
        with np.load(reviewed) as f:
            return [int(i) for i in f["ids"]] if "ids" in f.files else None
    except (OSError, ValueError):
        return None


def _threat(threat: ThreatModel | str) -> ThreatModel:
    if isinstance(threat, ThreatModel):
        return threat
    return parse_threat(threat)


def _recipe(name: str, threat: ThreatModel):
    from ..training import RECIPES

    if name not in RECIPES or name == "distillation":
        known = ", ".join(k for k in RECIPES if k != "distillation")
        raise InputError(f"recipe: expected one of {known}, got {name!r}")
    return RECIPES[name]() if name == "standard" else RECIPES[name](threat)


def _accuracy(model: Any, x: Tensor, y: Tensor) -> float:
    if x.shape[0] == 0:
        return float("nan")
    with torch.no_grad():
        pred = model.labels(x.to(getattr(model, "device", "cpu"))).cpu()
    return float((pred == y.cpu()).float().mean())


def _figures(model: Any, x, y, threat, suite, seed, reviewed) -> tuple[dict[str, Any], Any]:
    from ..audit import audit

    report = audit(model, x, y, threat, suite=list(suite), eps_curve=None, checks=False, seed=seed)
    assert report is not None  # one process: the report always comes back
    figures = {
        "clean_accuracy": float(report.clean_accuracy),
        "robust_accuracy": float(report.robust_accuracy),
        "reliable": bool(report.reliable),
        "reviewed_accuracy": _accuracy(model, *reviewed),
        "n": int(x.shape[0]),
        "suite": [dict(s) for s in suite],
        "threat": threat.to_dict(),
    }
    return figures, report


def _gate(old: Any, new: Any, max_drop: float) -> tuple[bool, str, dict[str, Any]]:
    """The promotion rule (see :data:`RULE`) on two audit reports: (promote?, why, the
    comparison's figures). :func:`advx.audit.compare` gates robust accuracy and the new audit's
    reliability; clean accuracy is gated here by the same ``max_drop``."""
    from ..audit import compare

    cmp = compare(old, new, max_drop=max_drop)
    problems = [c.message for c in cmp.failed]
    drop = float(old.clean_accuracy) - float(new.clean_accuracy)
    if drop > max_drop + 1e-9:
        problems.append(
            f"clean accuracy dropped by {drop:.4f} ({old.clean_accuracy:.4f} -> "
            f"{new.clean_accuracy:.4f}), more than max_drop {max_drop:g}"
        )
    r = cmp.robust_accuracy
    figures = {
        "robust_delta": r.delta,
        "robust_delta_interval": list(r.delta_ci),
        "interval_level": cmp.ci_level,
        "clean_delta": cmp.clean_accuracy.delta,
        "newly_broken": len(cmp.newly_broken),
        "newly_robust": len(cmp.newly_robust),
        "checks": [{"name": c.name, "passed": c.passed, "message": c.message} for c in cmp.checks],
    }
    if problems:
        return False, "; ".join(problems), figures
    return (
        True,
        f"no regression beyond max_drop {max_drop:g}: robust {old.robust_accuracy:.4f} -> "
        f"{new.robust_accuracy:.4f}, clean {old.clean_accuracy:.4f} -> {new.clean_accuracy:.4f}",
        figures,
    )


def _recalibrated(
    current: ModelVersion, model: Any, x: Tensor, y: Tensor, fpr, risk, seed
) -> tuple[Guard, Any]:
    """A guard for ``model`` with the current policy's detectors, actions and targets,
    calibrated on ``x, y``."""
    old = current.policy
    detectors = {
        name: build_detector(spec, model, who=f"recalibrate: detector {name!r}")
        for name, spec in old.detectors.items()
    }
    guard = Guard(model, detectors=detectors)
    guard.use(Policy(on_detect=old.on_detect, on_low_confidence=old.on_low_confidence))
    g = old.guarantees
    fpr = fpr if fpr is not None else g.get("fpr", {}).get("target", 0.05)
    risk = risk if risk is not None else g.get("selective_risk", {}).get("target")
    delta = g.get("selective_risk", {}).get("delta") or 1.0 - g.get("fpr", {}).get("level", 0.95)
    report = guard.calibrate(x, y, fpr=float(fpr), risk=risk, delta=float(delta), seed=seed)
    return guard, report


def _spec_of(version: ModelVersion) -> dict[str, Any] | None:
    from .._checkpoint import read_sidecar

    meta, _ = read_sidecar(version.path)
    info = meta.get("model") or {}
    return {"spec": info["spec"], "kwargs": info.get("kwargs") or {}} if info.get("spec") else None


# ---- the first version ------------------------------------------------------------------------
def init(
    model_dir: str | os.PathLike | ModelDir,
    model: Any,
    *,
    data: Data,
    detectors: str | Sequence[str] = ("feature_squeezing", "energy"),
    fpr: float = 0.05,
    risk: float | None = None,
    delta: float = 0.05,
    on_detect: str = "review",
    model_spec: str | dict[str, Any] | None = None,
    seed: int = 0,
) -> ModelVersion:
    """Calibrate a guard for ``model`` on clean held-out ``data`` and promote it as the first
    version of ``model_dir`` (which must hold none yet). Returns the loaded version."""
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    if md.versions():
        raise InputError(
            f"init: {md.root} already holds versions ({', '.join(md.versions())}); "
            "use update to add one"
        )
    from ..models.classifier import as_model

    clf = as_model(model)
    x, y = _data(data, "data")
    guard = Guard(clf, detectors=build_detectors(detectors, clf))
    guard.use(dataclasses.replace(guard.policy, on_detect=on_detect))  # type: ignore[arg-type]
    report = guard.calibrate(x, y, fpr=fpr, risk=risk, delta=delta, seed=seed)
    from ..data import data_sha256

    name = md.add(
        clf,
        guard.policy,
        model_spec=model_spec,
        info={
            "reason": "init",
            "data": {"calibration": {"sha256": data_sha256(x, y), "n": int(x.shape[0])}},
            "calibration": {"fpr": report.fpr, "selective_risk": report.selective_risk},
        },
    )
    return md.promote(name)


# ---- an update --------------------------------------------------------------------------------
def update(
    model_dir: str | os.PathLike | ModelDir,
    *,
    reviewed: Data,
    train_data: Data,
    audit_data: Data,
    calib_data: Data | None = None,
    recipe: str = "fgsm-rs",
    threat: ThreatModel | str = "linf:0.3",
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 5e-4,
    review_share: float = 0.25,
    train_n: int | None = None,
    max_drop: float = 0.01,
    fpr: float | None = None,
    risk: float | None = None,
    suite: Sequence[dict[str, Any]] = DEFAULT_SUITE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> UpdateResult:
    """Fine-tune the current version on ``reviewed`` (the ``.npz`` of ``advx review export``, or
    ``(x, y)``) mixed with ``train_data``, audit it against the current one on ``audit_data``,
    and promote it, recalibrated on ``calib_data`` (default ``audit_data``), when it does not
    regress (see the module's docstring for each step and :data:`RULE`). The data arguments are
    ``(x, y)`` tensors, a data set name or a path :func:`advx.data.load` reads.
    ``fpr``/``risk`` default to the current policy's targets. Never raises for a refusal: the
    result says what happened and why."""
    from ..data import data_sha256
    from ..training import fit

    who = "update"
    check_int(epochs, name="epochs", who=who, low=1)
    check_int(batch_size, name="batch_size", who=who, low=1)
    check_float(lr, name="lr", who=who, low_open=True)
    check_float(review_share, name="review_share", who=who, low_open=True, high=1, high_open=True)
    check_float(max_drop, name="max_drop", who=who, low=0, high=1, high_open=True)
    if train_n is not None:
        check_int(train_n, name="train_n", who=who, low=1)
    started = time.perf_counter()
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    th = _threat(threat)
    loss = _recipe(recipe, th)
    current = md.load(device=device)
    parent = current.name

    xr, yr = _data(reviewed, "reviewed")
    xt, yt = _data(train_data, "train_data")
    xa, ya = _data(audit_data, "audit_data")
    xc, yc = (xa, ya) if calib_data is None else _data(calib_data, "calib_data")
    if train_n is not None:
        xt, yt = xt[:train_n], yt[:train_n]
    if xr.shape[0] == 0:
        raise InputError("reviewed: holds no items; label some and export them first")
    for name, x in (("train_data", xt), ("audit_data", xa), ("calib_data", xc)):
        if x.shape[1:] != xr.shape[1:]:
            raise InputError(
                f"{name}: its inputs have shape {list(x.shape[1:])}, the reviewed items "
                f"{list(xr.shape[1:])}; they must be the same data"
            )
    data = {
        "reviewed": {
            "sha256": data_sha256(xr, yr),
            "n": int(xr.shape[0]),
            "items": _review_ids(reviewed),
        },
        "train": {"sha256": data_sha256(xt, yt), "n": int(xt.shape[0])},
        "audit": {"sha256": data_sha256(xa, ya), "n": int(xa.shape[0])},
        "calibration": {"sha256": data_sha256(xc, yc), "n": int(xc.shape[0])},
    }

    # 1. fine-tune a fresh copy of the current version; the reviewed items repeated to make up
    #    review_share of the mix (k copies of n_r among n_t: k n_r / (n_t + k n_r) >= share)
    model = md.load(parent, device=device).model
    n_t, n_r = int(xt.shape[0]), int(xr.shape[0])
    repeats = max(1, math.ceil(review_share * n_t / ((1 - review_share) * n_r)))
    x_mix = torch.cat([xt, xr.repeat(repeats, *([1] * (xr.dim() - 1)))])
    y_mix = torch.cat([yt, yr.repeat(repeats)])
    t0 = time.perf_counter()
    history = fit(
        model,
        x_mix,
        y_mix,
        loss=loss,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
        desc=f"update {parent}",
    )
    model.net.eval()
    training = {
        "recipe": recipe,
        "recipe_params": loss.params,
        "threat": th.to_dict(),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_train": n_t,
        "n_reviewed": n_r,
        "review_repeats": repeats,
        "review_share": review_share,
        "stopped": history.stopped,
        "seconds": round(time.perf_counter() - t0, 3),
    }

    # 2. audit both on the same held-out data, attacks and seed
    old_fig, old_report = _figures(current.model, xa, ya, th, suite, seed, (xr, yr))
    new_fig, new_report = _figures(model, xa, ya, th, suite, seed, (xr, yr))
    ok, reason, comparison = _gate(old_report, new_report, float(max_drop))

    def result(promoted: bool, reason: str, version=None, calibration=None) -> UpdateResult:
        r = UpdateResult(
            promoted=promoted,
            reason=reason,
            parent=parent,
            version=version,
            old=old_fig,
            new=new_fig,
            max_drop=float(max_drop),
            training=training,
            calibration=calibration,
            comparison=comparison,
            data=data,
            seconds=round(time.perf_counter() - started, 3),
        )
        log.info("update: %s", r.lines()[0])
        return r

    # 3. the gate
    if not ok:
        return result(False, reason)

    # 4. recalibrate for the new weights
    try:
        guard, report = _recalibrated(current, model, xc, yc, fpr, risk, seed)
    except InputError as e:
        return result(False, f"recalibration failed: {e}")
    calibration = {
        "hash": guard.policy.hash,
        "fpr": report.fpr,
        "selective_risk": report.selective_risk,
    }

    # 5. write and promote (the version is loaded completely before the pointer moves)
    name = md.add(
        model,
        guard.policy,
        model_spec=_spec_of(current),
        parent=parent,
        info={
            "reason": reason,
            "rule": RULE,
            "max_drop": float(max_drop),
            "data": data,
            "training": training,
            "audit": {"old": old_fig, "new": new_fig, "comparison": comparison},
            "calibration": calibration,
        },
    )
    try:
        md.promote(name, device=device)
    except InputError as e:
        return result(False, f"{name} was written but could not be loaded: {e}", name, calibration)
    return result(True, reason, name, calibration)
