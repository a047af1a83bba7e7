"""The guard: protect a deployed classifier.

Validation, calibrated detection and abstention, fallback (``Guard``), the policy it decides
by (``Policy``), and, in submodules, the HTTP service, monitoring, stateful query detection and
the human review queue.
"""

from .decision import ACTIONS, Decision, Decisions
from .guard import Guard
from .policy import Policy

__all__ = ["ACTIONS", "Decision", "Decisions", "Guard", "Policy"]
