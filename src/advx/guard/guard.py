"""The Guard: validate, predict, score, decide — per input, never failing the batch.

>>> guard = advx.guard.Guard(model, detectors=[FeatureSqueezing(model)])
>>> guard.calibrate(x_clean, y_clean, fpr=0.05)
>>> decisions = guard(x)                  # one Decision per input
>>> decisions[0].action, decisions[0].label, decisions[0].reasons
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..defenses.detectors import Detector
from ..errors import InputError
from ..models._base import Model
from ..models.classifier import as_model
from .decision import ACTIONS, Action, Decision, Decisions
from .policy import Policy
from .validate import MAX_ROWS, check_rows

if TYPE_CHECKING:
    from .calibrate import CalibrationReport

__all__ = ["Guard"]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _strictest(actions: Sequence[Action]) -> Action:
    return max(actions, key=ACTIONS.index)


class Guard:
    """Protects ``model``: every input gets a :class:`Decision`.

    ``detectors``: :class:`~advx.defenses.Detector` objects (a mapping names them; a list is
    named after each class). ``fallback``: a model answering when a rule says ``"fallback"``
    (without one, such inputs are abstained on). ``policy``: thresholds and actions; without
    one, the guard validates and abstains below 0.5 confidence. ``input_shape``: the shape of
    one input, e.g. ``(1, 28, 28)``; ``None`` takes the first input's. ``version``: the model
    version in every decision (default: the first 12 digits of the model's fingerprint).
    """

    def __init__(
        self,
        model: Any,
        *,
        detectors: Mapping[str, Detector] | Sequence[Detector] = (),
        fallback: Any = None,
        policy: Policy | None = None,
        input_shape: Sequence[int] | None = None,
        version: str | None = None,
        max_rows: int = MAX_ROWS,
    ) -> None:
        self.model: Model = as_model(model)
        if isinstance(detectors, Mapping):
            named = dict(detectors)
        else:
            named = {}
            for d in detectors:
                name = _snake(type(d).__name__)
                if name in named:
                    raise InputError(
                        f"Guard: two detectors named {name!r}; pass a mapping to name them"
                    )
                named[name] = d
        for name, d in named.items():
            if not isinstance(d, Detector):
                raise InputError(
                    f"Guard: detectors[{name!r}] must be an advx.defenses.Detector, "
                    f"got {type(d).__name__}"
                )
        self.detectors: dict[str, Detector] = named
        self.fallback: Model | None = None if fallback is None else as_model(fallback)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.version = version or self.model.fingerprint()[:12]
        self.max_rows = int(max_rows)
        self.policy = Policy()
        if policy is not None:
            self.use(policy)

    @classmethod
    def from_policy(
        cls, model: Any, policy: Policy | str | os.PathLike, fallback: Any = None, **kw: Any
    ) -> Guard:
        """The guard a policy describes: its detectors rebuilt from their specs for ``model``,
        its thresholds adopted. ``policy``: a :class:`Policy` or the path of a policy file.
        Refuses a policy calibrated for another model (:class:`~advx.errors.InputError`).
        ``kw`` go to the constructor (``input_shape``, ``version``, ``max_rows``)."""
        from .registry import build_detector

        if not isinstance(policy, Policy):
            policy = Policy.load(policy)
        m = as_model(model)
        fp = policy.model_fingerprint
        if fp is not None and fp != m.fingerprint():
            # checked before the detectors are built: the clearer error comes first
            cls(m).use(policy)
        detectors = {
            name: build_detector(spec, m, who=f"policy: detector {name!r}")
            for name, spec in policy.detectors.items()
        }
        return cls(m, detectors=detectors, fallback=fallback, policy=policy, **kw)

    def calibrate(
        self,
        x: Tensor,
        y: Tensor,
        *,
        fpr: float = 0.05,
        risk: float | None = None,
        delta: float = 0.05,
        seed: int = 0,
    ) -> CalibrationReport:
        """Set the thresholds on clean held-out ``x, y`` so that the whole policy flags a share
        ``fpr`` of clean inputs (reported with its interval) and, with ``risk``, the confidence
        floor so that the error rate on accepted inputs is at most ``risk`` with probability at
        least ``1 - delta``; adopt the new policy. See :mod:`advx.guard.calibrate`."""
        from .calibrate import calibrate

        return calibrate(self, x, y, fpr=fpr, risk=risk, delta=delta, seed=seed)

    def as_detector(self, *, scales: Mapping[str, float] | None = None) -> Detector:
        """The whole policy as one detector (fires when any rule fires), for adaptive attacks:
        ``DetectorAware(guard.model, guard.as_detector())``. ``scales`` default to the spread
        of each score on the calibration data."""
        from .scores import PolicyDetector

        pol = self.policy
        if scales is None:
            scales = dict(pol.calibration.get("scales", {}))
        return PolicyDetector(
            self.model,
            self.detectors,
            pol.thresholds,
            min_confidence=pol.min_confidence,
            scales=scales,
        )

    @property
    def bounds(self) -> tuple[float, float]:
        return self.model.bounds

    def use(self, policy: Policy) -> Guard:
        """Adopt ``policy``; refuses one calibrated for another model or naming unknown
        detectors. Returns the guard."""
        fp = policy.model_fingerprint
        if fp is not None and fp != self.model.fingerprint():
            raise InputError(
                f"policy: calibrated for model {fp[:12]}, but this model is "
                f"{self.model.fingerprint()[:12]}; recalibrate it for this model "
                "(guard.calibrate or advx guard calibrate)"
            )
        unknown = sorted(set(policy.thresholds) - set(self.detectors))
        if unknown:
            raise InputError(
                f"policy: thresholds for detectors this guard does not have: {unknown}; "
                f"it has {sorted(self.detectors)}"
            )
        self.policy = policy
        shape = policy.calibration.get("input_shape")
        if self.input_shape is None and isinstance(shape, list):
            # the shape calibrated on is the shape the guard expects: refuse rows of any other
            self.input_shape = tuple(int(s) for s in shape)
        for name, t in policy.thresholds.items():
            # the detectors carry their thresholds too, for detect() and DetectorAware
            self.detectors[name].threshold = t
        return self

    def score(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Softmax probabilities ``(N, C)`` and each detector's scores ``(N,)`` for valid ``x``."""
        with torch.no_grad():
            logits = self.model.scores(x)
            probs = F.softmax(logits.float(), dim=1)
            # a detector watching this same model reuses its logits at x: one pass, not one
            # per detector
            scores = {
                name: d.score(x, logits=logits if d.model is self.model else None).float()
                for name, d in self.detectors.items()
            }
        return probs, scores

    def __call__(self, x: Any) -> Decisions:
        """One :class:`Decision` per row of ``x`` (a tensor, an array or a list of rows)."""
        return self.decide(x)[0]

    def decide(self, x: Any) -> tuple[Decisions, Tensor | None]:
        """The decisions for the rows of ``x`` and the model's softmax probabilities ``(N, C)``
        they were made from (a row that failed validation gets NaN; ``None`` when no row was
        valid): what a service answers with, from the one model pass the guard made."""
        try:
            good, index, bad = check_rows(
                x, shape=self.input_shape, bounds=self.bounds, max_rows=self.max_rows
            )
        except ValueError as e:
            raise InputError(str(e)) from None
        n = len(index) + len(bad)
        out: list[Decision | None] = [None] * n
        ph, version = self.policy.hash, self.version
        for i, why in bad.items():
            out[i] = Decision(
                "reject", None, None, None, {}, (f"invalid input: {why}",), version, ph
            )
        all_probs: Tensor | None = None
        if good is not None:
            good = good.to(getattr(self.model, "device", "cpu"))
            decided, probs = self._decide(good)
            for j, d in zip(index, decided, strict=True):
                out[j] = d
            if bad:
                all_probs = probs.new_full((n, probs.shape[1]), float("nan"))
                all_probs[torch.tensor(index, device=probs.device)] = probs
            else:
                all_probs = probs
        return Decisions([d for d in out if d is not None]), all_probs

    def _decide(self, x: Tensor) -> tuple[list[Decision], Tensor]:
        pol = self.policy
        probs, scores = self.score(x)
        # to the host once: the rules below are per-row Python
        conf_t, pred_t = probs.max(dim=1)
        conf, pred = conf_t.tolist(), pred_t.tolist()
        rows_by_name = {name: s.tolist() for name, s in scores.items()}
        fb_labels = None
        decisions = []
        for i in range(x.shape[0]):
            c = conf[i]
            row = {name: vals[i] for name, vals in rows_by_name.items()}
            actions: list[Action] = ["accept"]
            reasons: list[str] = []
            for name, t in pol.thresholds.items():
                if row[name] > t:
                    actions.append(pol.on_detect)
                    reasons.append(f"{name} {row[name]:.4g} > {t:.4g}")
            if c < pol.min_confidence:
                actions.append(pol.on_low_confidence)
                reasons.append(f"confidence {c:.4g} < {pol.min_confidence:.4g}")
            action = _strictest(actions)
            label: int | None = pred[i] if action == "accept" else None
            if action == "fallback":
                if self.fallback is None:
                    action = "abstain"
                    reasons.append("no fallback model configured")
                else:
                    if fb_labels is None:
                        with torch.no_grad():
                            fb_labels = self.fallback.labels(x).tolist()
                    label = fb_labels[i]
            row["confidence"] = c
            decisions.append(
                Decision(action, label, pred[i], c, row, tuple(reasons), self.version, pol.hash)
            )
        return decisions, probs

    def __repr__(self) -> str:
        return (
            f"Guard({self.model!r}, detectors={sorted(self.detectors)}, policy={self.policy.hash})"
        )
