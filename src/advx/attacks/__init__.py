"""Attacks. Each lives in its own module and registers itself; this package imports them all.

``create(name, threat, **params)`` builds one by name, ``list()`` names them all.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ._base import Attack, Problem
from ._registry import create, get, info, list_attacks, register
from ._repeat import Repeated
from ._result import AttackResult, RunOutput

# Import every attack module so that it registers: adding an attack is adding one file.
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

from ._registry import _REGISTRY  # noqa: E402

globals().update({cls.__name__: cls for cls in _REGISTRY.values()})
list = list_attacks

if TYPE_CHECKING:  # the names the registry puts here at import, spelled out for type checkers
    from .apgd import APGD as APGD
    from .boundary import Boundary as Boundary
    from .cw import CW as CW
    from .ddn import DDN as DDN
    from .deepfool import DeepFool as DeepFool
    from .fab import FAB as FAB
    from .fgsm import FGSM as FGSM
    from .fmn import FMN as FMN
    from .hopskipjump import HopSkipJump as HopSkipJump
    from .pgd import PGD as PGD
    from .simba import SimBA as SimBA
    from .square import Square as Square
    from .zoo import ZOO as ZOO

from ._targets import random_targets  # noqa: E402
from .curve import robustness_curve  # noqa: E402
from .worstcase import WorstCase  # noqa: E402

__all__ = [
    "Attack",
    "AttackResult",
    "Problem",
    "Repeated",
    "RunOutput",
    "create",
    "get",
    "info",
    "list",
    "list_attacks",
    "register",
    "random_targets",
    "robustness_curve",
    "WorstCase",
    *sorted(cls.__name__ for cls in _REGISTRY.values()),
]
