"""Scores the guard adds to advx's detectors: out-of-distribution scores, low confidence, and
the whole policy seen as one detector (what an adaptive attacker has to evade).

Every score follows the detectors' convention: one number per input, higher is more suspicious,
differentiable with respect to the input when autograd is on (so that
:class:`~advx.defenses.DetectorAware` can attack it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float, positive_float
from ..defenses.detectors import Detector
from ..errors import InputError

__all__ = ["EnergyScore", "MaxLogitScore", "LowConfidence", "PolicyDetector"]


class EnergyScore(Detector):
    """The free energy of the logits, ``-T * logsumexp(z / T)`` (Liu et al., NeurIPS 2020,
    "Energy-based out-of-distribution detection"): in-distribution inputs get low energy, so a
    high score marks an input unlike the training data. ``temperature``: T (1 in the paper)."""

    def __init__(self, model, *, temperature: float = 1.0) -> None:
        super().__init__(model)
        self.temperature = positive_float(temperature, name="temperature", who="EnergyScore")

    takes_logits = True

    def _score(self, x: Tensor, *, bpda: bool = True, logits: Tensor | None = None) -> Tensor:
        z = self._logits(x, logits).float()
        t = self.temperature
        return -t * torch.logsumexp(z / t, dim=1)  # (N, C) -> (N,)

    def spec(self) -> dict:
        return {"kind": "energy", "temperature": self.temperature}


class MaxLogitScore(Detector):
    """Minus the largest logit (Hendrycks et al., ICML 2022, "Scaling out-of-distribution
    detection for real-world settings"): unlike the softmax, it keeps how far the input is
    from every class, so an input that is far from all of them scores high."""

    takes_logits = True

    def _score(self, x: Tensor, *, bpda: bool = True, logits: Tensor | None = None) -> Tensor:
        return -self._logits(x, logits).float().amax(dim=1)  # (N, C) -> (N,)

    def spec(self) -> dict:
        return {"kind": "max_logit"}


class LowConfidence(Detector):
    """One minus the model's top softmax probability: the guard's low-confidence rule as a
    detector, so that an adaptive attack can be asked to evade it too."""

    takes_logits = True

    def _score(self, x: Tensor, *, bpda: bool = True, logits: Tensor | None = None) -> Tensor:
        return 1.0 - F.softmax(self._logits(x, logits).float(), dim=1).amax(dim=1)

    def spec(self) -> dict:
        return {"kind": "low_confidence"}


class PolicyDetector(Detector):
    """A guard's whole policy as one detector: it fires exactly when any rule fires.

    Score: ``max_i (s_i(x) - t_i) / scale_i`` over the detectors and their thresholds (and the
    confidence floor, as :class:`LowConfidence` with threshold ``1 - min_confidence``), with
    threshold 0. ``scales`` put the scores in comparable units for a gradient-based attacker
    (the spread of each score on clean data is a good choice); they do not change which inputs
    are flagged. Give it to :class:`~advx.defenses.DetectorAware` to attack the guard
    adaptively.
    """

    def __init__(
        self,
        model,
        detectors: Mapping[str, Detector],
        thresholds: Mapping[str, float],
        *,
        min_confidence: float | None = None,
        scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(model)
        parts: dict[str, tuple[Detector, float]] = {}
        for name, t in thresholds.items():
            if name not in detectors:
                raise InputError(
                    f"PolicyDetector: a threshold for {name!r}, which is not among the "
                    f"detectors {sorted(detectors)}"
                )
            t = float(check_float(t, name=f"thresholds[{name!r}]", low=None))  # type: ignore[arg-type]
            parts[name] = (detectors[name], t)
        if min_confidence is not None and min_confidence > 0:
            check_float(min_confidence, name="min_confidence", low=0, high=1)
            parts["confidence"] = (LowConfidence(model), 1.0 - float(min_confidence))
        if not parts:
            raise InputError("PolicyDetector: no rule to evade (no thresholds, no floor)")
        scales = dict(scales or {})
        self.parts = parts
        self.scales = {n: float(scales.get(n, 1.0)) or 1.0 for n in parts}
        self.threshold = 0.0

    def _score(self, x: Tensor, *, bpda: bool = True) -> Tensor:
        margins = [
            (d._score(x, bpda=bpda).float() - t) / self.scales[name]
            for name, (d, t) in self.parts.items()
        ]
        return torch.stack(margins).amax(dim=0)  # (R, N) -> (N,)

    def __repr__(self) -> str:
        return f"PolicyDetector({self.model!r}, rules={sorted(self.parts)})"
