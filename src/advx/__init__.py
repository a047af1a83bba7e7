"""advx: adversarial examples for PyTorch -- attack, audit, harden and guard classifiers.

>>> import advx
>>> model = advx.Classifier(net, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
>>> result = advx.PGD(advx.Linf(8 / 255), steps=40)(model, x, y)
>>> result.success.float().mean()
"""

from ._version import __version__
from .attacks import Attack, AttackResult, WorstCase
from .attacks.apgd import APGD
from .attacks.boundary import Boundary
from .attacks.curve import robustness_curve
from .attacks.cw import CW
from .attacks.ddn import DDN
from .attacks.deepfool import DeepFool
from .attacks.fab import FAB
from .attacks.fgsm import FGSM
from .attacks.fmn import FMN
from .attacks.hopskipjump import HopSkipJump
from .attacks.pgd import PGD
from .attacks.simba import SimBA
from .attacks.square import Square
from .attacks.zoo import ZOO
from .audit import Comparison, Report, audit, compare
from .errors import AccessError, AdvxError, BudgetExceeded, InputError, ModelError, QueryError
from .models import BlackBox, Classifier
from .threat import L1, L2, Linf, ThreatModel

__all__ = [
    "__version__",
    "Classifier",
    "BlackBox",
    "ThreatModel",
    "Linf",
    "L2",
    "L1",
    "Attack",
    "AttackResult",
    "FGSM",
    "PGD",
    "CW",
    "APGD",
    "FAB",
    "DDN",
    "FMN",
    "DeepFool",
    "Square",
    "ZOO",
    "SimBA",
    "Boundary",
    "HopSkipJump",
    "WorstCase",
    "robustness_curve",
    "audit",
    "Report",
    "compare",
    "Comparison",
    "AdvxError",
    "InputError",
    "AccessError",
    "QueryError",
    "BudgetExceeded",
    "ModelError",
]

_SUBMODULES = {
    "attacks",
    "data",
    "zoo",
    "training",
    "models",
    "threat",
    "errors",
    "viz",
    "defenses",
}


def __getattr__(name: str):
    # `advx.data.load(...)` etc. without importing every subpackage (and its extras) up front
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'advx' has no attribute {name!r}")
