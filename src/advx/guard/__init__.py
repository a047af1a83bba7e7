"""The guard: protect a deployed classifier.

Validation, calibrated detection and abstention, fallback (``Guard``), the policy it decides
by (``Policy``), and, in submodules, the HTTP service, monitoring, stateful query detection and
the human review queue.
"""

from .calibrate import CalibrationReport
from .decision import ACTIONS, Decision, Decisions
from .guard import Guard
from .policy import Policy
from .registry import DETECTORS, build_detector, build_detectors, register_detector
from .scores import EnergyScore, LowConfidence, MaxLogitScore, PolicyDetector

__all__ = [
    "ACTIONS",
    "CalibrationReport",
    "DETECTORS",
    "Decision",
    "Decisions",
    "EnergyScore",
    "Guard",
    "LowConfidence",
    "MaxLogitScore",
    "Policy",
    "PolicyDetector",
    "build_detector",
    "build_detectors",
    "register_detector",
]
