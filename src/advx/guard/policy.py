"""The guard's policy: which rule fires at which threshold, and what it then does.

A policy is a value: thresholds per detector, a confidence floor, the action of each rule, and
(once calibrated) the guarantees it was calibrated for and the fingerprint of the model it is
bound to. Its hash goes into every decision, so a decision can be traced to the policy that
made it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .._validate import check_choice, check_float
from .decision import ACTIONS, Action

__all__ = ["Policy"]


@dataclass(frozen=True)
class Policy:
    """``thresholds``: detector name -> score above which the input is flagged.
    ``min_confidence``: the model's top softmax probability below which the guard abstains.
    ``on_detect`` / ``on_low_confidence``: the action of each rule (the strictest firing rule
    wins). ``model_fingerprint``: the model the thresholds were calibrated for (``None``: any).
    ``guarantees`` and ``calibration`` record what calibration promised and on what data.
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    min_confidence: float = 0.5
    on_detect: Action = "review"
    on_low_confidence: Action = "abstain"
    model_fingerprint: str | None = None
    guarantees: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_float(self.min_confidence, name="min_confidence", low=0, high=1, who="Policy")
        for name in ("on_detect", "on_low_confidence"):
            check_choice(getattr(self, name), ACTIONS, name=name, who="Policy")
        for k, v in self.thresholds.items():
            check_float(v, name=f"thresholds[{k!r}]", who="Policy")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hash(self) -> str:
        """sha256 of the policy's canonical JSON, first 16 hex digits."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
