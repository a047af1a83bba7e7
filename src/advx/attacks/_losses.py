"""Losses that attacks maximize, one value per sample.

Convention: larger is better for the attacker, for the untargeted and the targeted case alike,
and ``margin > 0`` exactly when the sample is adversarial.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["ce", "margin", "other_max", "LOSSES", "get_loss"]


def other_max(logits: Tensor, labels: Tensor) -> Tensor:
    """Largest logit among the classes other than ``labels``, shape (N,)."""
    masked = logits.scatter(1, labels.view(-1, 1), float("-inf"))
    return masked.amax(dim=1)


def ce(logits: Tensor, labels: Tensor, targeted: bool = False) -> Tensor:
    """Cross-entropy of the true class (untargeted) or minus that of the target class."""
    loss = F.cross_entropy(logits, labels, reduction="none")
    return -loss if targeted else loss


def margin(logits: Tensor, labels: Tensor, targeted: bool = False) -> Tensor:
    """Carlini-Wagner margin: best other logit minus the true one (untargeted), or the target's
    logit minus the best other one (targeted)."""
    own = logits.gather(1, labels.view(-1, 1)).view(-1)
    other = other_max(logits, labels)
    return own - other if targeted else other - own


LOSSES = {"ce": ce, "margin": margin}


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"loss: expected one of {sorted(LOSSES)}, got {name!r}") from None
