"""Defenses: input transforms, ensembles, EOT and detectors, each a model wrapper.

Every defense is an advx Model: attack it, audit it or guard it like any classifier.

    >>> model = advx.Classifier(net)
    >>> squeezed = advx.defenses.BitDepth(model, bits=1)          # attacked with BPDA
    >>> advx.PGD(advx.Linf(0.3))(squeezed, x, y)
    >>> noisy = advx.defenses.EOT(advx.defenses.RandomNoise(model, sigma=0.25), n=16)
    >>> detector = advx.defenses.FeatureSqueezing(model).calibrate(x_clean, fpr=0.05)
    >>> adaptive = advx.defenses.DetectorAware(model, detector)  # K + 1 classes
"""

from ._base import Defense, straight_through
from .detectors import (
    Detector,
    DetectorAware,
    EnsembleDisagreement,
    FeatureSqueezing,
    adaptive_success,
)
from .ensemble import Ensemble
from .eot import EOT
from .transforms import (
    JPEG,
    BitDepth,
    MedianSmoothing,
    RandomNoise,
    Transformed,
    bit_depth,
    jpeg_compress,
    median_smooth,
)

__all__ = [
    "Defense",
    "straight_through",
    "Transformed",
    "BitDepth",
    "MedianSmoothing",
    "JPEG",
    "RandomNoise",
    "bit_depth",
    "median_smooth",
    "jpeg_compress",
    "Ensemble",
    "EOT",
    "Detector",
    "FeatureSqueezing",
    "EnsembleDisagreement",
    "DetectorAware",
    "adaptive_success",
]
