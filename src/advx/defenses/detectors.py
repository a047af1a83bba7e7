"""Detectors of adversarial inputs, and the combined model that adaptive attacks target.

A :class:`Detector` scores inputs (higher: more suspicious) and flags those above a threshold
calibrated on clean data for a chosen false-positive rate. A detector is only as good as the
attack it was measured against: :class:`DetectorAware` turns "fool the classifier without
being flagged" into a plain targeted attack (Carlini & Wagner, 2017, "Adversarial examples are
not easily detected"), and :func:`adaptive_success` scores the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_float, check_images, check_labels, positive_float
from ..errors import InputError
from ..models._base import Model, ModelView, Tracker
from ..models.classifier import as_model
from ._base import Defense, check_scores, chunked, graph, straight_through
from .ensemble import Ensemble
from .transforms import _pillow, bit_depth, jpeg_compress, median_smooth

__all__ = [
    "Detector",
    "FeatureSqueezing",
    "EnsembleDisagreement",
    "DetectorAware",
    "adaptive_success",
]


class Detector:
    """Scores inputs for a model; ``detect`` flags the scores above ``threshold``.

    Subclasses implement ``_score(x, bpda=True)``: one score per input, differentiable with
    respect to x when autograd is on (through BPDA where a part is not differentiable). A
    subclass that needs the model's logits at ``x`` itself sets ``takes_logits`` and accepts
    ``logits=``: a caller that already ran the model on ``x`` (the guard) passes them and the
    detector skips that pass.
    """

    model: Model
    threshold: float | None = None
    fpr: float | None = None
    takes_logits: bool = False

    def __init__(self, model) -> None:
        self.model = as_model(model)
        check_scores(self.model, type(self).__name__)
        self.bounds = self.model.bounds
        self.threshold = None
        self.fpr = None

    def _score(self, x: Tensor, *, bpda: bool = True) -> Tensor:
        raise NotImplementedError

    def score(self, x: Tensor, *, logits: Tensor | None = None) -> Tensor:
        """How suspicious each input is, shape (N,): higher is more suspicious. ``logits``: the
        model's scores at ``x`` (N, C), when the caller has them (used if ``takes_logits``)."""
        x = check_images(x, self.bounds, name="x")
        self.model.check_input(x)
        size = self.model.batch_size_for(x, grad=False)
        with self.model.prepared(), torch.no_grad():
            if logits is None or not self.takes_logits:
                return chunked(self._score, x, size)
            z = logits

            def part(rows: Tensor) -> Tensor:
                return self._score(x[rows], logits=z[rows])  # type: ignore[call-arg]

            return chunked(part, torch.arange(x.shape[0], device=x.device), size)

    def _logits(self, x: Tensor, logits: Tensor | None) -> Tensor:
        """The model's logits at ``x``: the caller's when given, else one pass."""
        return graph(self.model, x) if logits is None else logits

    def calibrate(self, x_clean: Tensor, fpr: float = 0.05) -> Detector:
        """Set the threshold to the (1 - fpr) quantile of the scores of clean inputs, so that
        about ``fpr`` of clean inputs are flagged. Returns the detector."""
        check_float(
            fpr, name="fpr", low_open=True, high=1, high_open=True, hint="a false-positive rate"
        )
        scores = self.score(x_clean)
        if scores.numel() == 0:
            raise InputError("x_clean: no inputs to calibrate on")
        if scores.numel() < math.ceil(1 / fpr):
            raise InputError(
                f"x_clean: {scores.numel()} inputs cannot pin a false-positive rate of {fpr:g}; "
                f"give at least {math.ceil(1 / fpr)} (ideally many more)"
            )
        self.threshold = float(torch.quantile(scores.double().cpu(), 1 - fpr))
        self.fpr = float(fpr)
        return self

    def _require_threshold(self) -> float:
        if self.threshold is None:
            raise InputError(
                f"{type(self).__name__}: no threshold yet; call .calibrate(x_clean, fpr=0.05) "
                "on clean data first (or set .threshold)"
            )
        return float(self.threshold)

    def detect(self, x: Tensor) -> Tensor:
        """bool (N,): the inputs whose score is above the threshold."""
        threshold = self._require_threshold()
        return self.score(x) > threshold

    def __repr__(self) -> str:
        t = "" if self.threshold is None else f", threshold={self.threshold:.4g}"
        return f"{type(self).__name__}({self.model!r}{t})"


_SQUEEZERS = {"bits": "bit depth", "median": "median smoothing", "jpeg": "JPEG quality"}


class FeatureSqueezing(Detector):
    """Feature squeezing (Xu et al., 2018): an input whose prediction moves a lot when it is
    squeezed is suspicious. Score: the largest, over the squeezers, L1 distance between the
    softmax of the input and that of the squeezed input.

    ``squeezers``: specs ``"bits:B"`` (B-bit depth), ``"median:K"`` (K x K median filter),
    ``"jpeg:Q"`` (JPEG at quality Q), or callables mapping a batch to a batch. The paper's
    MNIST detector is the default, 1-bit depth and a 2 x 2 median filter. When an attack
    differentiates the score (see :class:`DetectorAware`), squeezers are passed with BPDA.
    """

    def __init__(
        self, model, squeezers: Sequence[str | Callable[[Tensor], Tensor]] = ("bits:1", "median:2")
    ) -> None:
        super().__init__(model)
        if isinstance(squeezers, str) or callable(squeezers):
            squeezers = (squeezers,)
        if not squeezers:
            raise InputError(
                "FeatureSqueezing: give at least one squeezer, e.g. ('bits:1', 'median:2')"
            )
        self.names = []
        self.squeezers = []
        for s in squeezers:
            name, fn = self._parse(s)
            self.names.append(name)
            self.squeezers.append(fn)

    def _parse(self, spec) -> tuple[str, Callable[[Tensor], Tensor]]:
        if callable(spec):
            return getattr(spec, "__name__", type(spec).__name__), spec
        kind, _, value = str(spec).partition(":")
        known = ", ".join(f"'{k}:N' ({v})" for k, v in _SQUEEZERS.items())
        if kind not in _SQUEEZERS or not value.strip().isdigit():
            raise InputError(
                f"FeatureSqueezing: unknown squeezer {spec!r}; expected {known}, or a callable"
            )
        n = int(value)
        if kind == "bits" and not 1 <= n <= 16:
            raise InputError(f"FeatureSqueezing: {spec!r}: bits must be from 1 to 16")
        if kind == "median" and n < 2:
            raise InputError(f"FeatureSqueezing: {spec!r}: the median window must be at least 2")
        if kind == "jpeg":
            _pillow("FeatureSqueezing")
            if not 1 <= n <= 95:
                raise InputError(f"FeatureSqueezing: {spec!r}: JPEG quality must be from 1 to 95")
        fn = {
            "bits": partial(bit_depth, bits=n, bounds=self.bounds),
            "median": partial(median_smooth, size=n),
            "jpeg": partial(jpeg_compress, quality=n, bounds=self.bounds),
        }[kind]
        return f"{kind}:{n}", fn

    takes_logits = True

    def _score(self, x: Tensor, *, bpda: bool = True, logits: Tensor | None = None) -> Tensor:
        p = F.softmax(self._logits(x, logits), dim=1)
        through = bpda and torch.is_grad_enabled()
        dists = []
        for fn in self.squeezers:
            xs = straight_through(fn, x) if through else fn(x)
            ps = F.softmax(graph(self.model, xs), dim=1)
            dists.append((p - ps).abs().sum(dim=1))
        return torch.stack(dists).amax(dim=0)  # (S, N) -> (N,)

    def __repr__(self) -> str:
        t = "" if self.threshold is None else f", threshold={self.threshold:.4g}"
        return f"FeatureSqueezing({self.model!r}, squeezers={self.names}{t})"


class EnsembleDisagreement(Detector):
    """Score: the ensemble's :meth:`~advx.defenses.Ensemble.disagreement` (the mean total
    variation between each member's probabilities and the ensemble's)."""

    def __init__(self, ensemble: Ensemble) -> None:
        if not isinstance(ensemble, Ensemble):
            raise InputError(
                "EnsembleDisagreement: expected an advx.defenses.Ensemble, "
                f"got {type(ensemble).__name__}"
            )
        super().__init__(ensemble)
        self.ensemble = ensemble

    def _score(self, x: Tensor, *, bpda: bool = True) -> Tensor:
        return self.ensemble._disagreement(x)


class DetectorAware(Defense):
    """The classifier and its detector as one model with K + 1 classes, for adaptive attacks.

    Logits: the model's K logits z, and z_K = max_j z_j + scale * (score(x) - threshold). Class
    K wins exactly when the detector fires (score above the threshold), so a *targeted* attack
    on this model towards a real class t != y finds inputs classified as t and not detected
    (Carlini & Wagner, 2017). The extra logit is differentiable through the detector, with BPDA
    through non-differentiable squeezers (``bpda=True``). ``scale`` converts score units to
    logit units: it changes how hard the attack is pushed away from detection, not the decision.

    The detector's threshold is read at every pass: calibrate it first.
    """

    def __init__(
        self, model, detector: Detector, *, bpda: bool = True, scale: float = 10.0
    ) -> None:
        if not isinstance(detector, Detector):
            raise InputError(
                "DetectorAware: detector must be an advx.defenses.Detector, "
                f"got {type(detector).__name__}"
            )
        positive_float(scale, name="scale", who="DetectorAware")
        super().__init__(model, name="DetectorAware")
        check_scores(self.model, "DetectorAware")
        if tuple(detector.bounds) != self.bounds:
            raise InputError(
                f"DetectorAware: the detector's bounds {detector.bounds} differ from "
                f"the model's {self.bounds}"
            )
        detector._require_threshold()
        self.detector = detector
        self.bpda = bool(bpda)
        self.scale = float(scale)

    def _wrapped(self) -> list[Model]:
        return (
            [self.model] if self.detector.model is self.model else [self.model, self.detector.model]
        )

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        k = self.model.num_classes
        return None if k is None else k + 1

    def __repr__(self) -> str:
        return f"DetectorAware({self.model!r}, {self.detector!r}, bpda={self.bpda})"

    def forward(self, x: Tensor) -> Tensor:
        z = graph(self.model, x)
        score = self.detector._score(x, bpda=self.bpda).to(z.dtype)
        extra = z.amax(dim=1) + self.scale * (score - self.detector._require_threshold())
        return torch.cat([z, extra.unsqueeze(1)], dim=1)  # (N, K) -> (N, K + 1)


def adaptive_success(model, detector: Detector, x_adv: Tensor, y: Tensor) -> Tensor:
    """bool (N,): misclassified by ``model`` (the plain classifier, K classes) AND not flagged
    by ``detector`` -- what an attack on a detector-guarded model has to achieve."""
    model = as_model(model)
    x_adv = check_images(x_adv, model.bounds, name="x_adv")
    model.check_input(x_adv)
    y = check_labels(y, x_adv.shape[0], x_adv.device)
    with model.prepared(), torch.no_grad():
        pred = ModelView(model, Tracker(x_adv.shape[0], x_adv.device)).labels(x_adv)
    return (pred != y) & ~detector.detect(x_adv)
