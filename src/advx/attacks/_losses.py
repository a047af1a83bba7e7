"""Losses that attacks maximize, one value per sample.

Convention: larger is better for the attacker, for the untargeted and the targeted case alike,
and ``margin > 0`` (likewise ``dlr > 0`` and ``dlr_targeted > 0``) exactly when the sample is
adversarial.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["ce", "margin", "dlr", "dlr_targeted", "other_max", "LOSSES", "LossFn", "get_loss"]

# (logits (N, C), labels (N,), ...) -> one value per sample (N,)
LossFn = Callable[..., Tensor]


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


def _sorted_logits(logits: Tensor, need: int, who: str) -> Tensor:
    """Logits sorted in decreasing order, (N, C); DLR's scale needs at least ``need`` classes."""
    if logits.shape[1] < need:
        raise InputError(
            f"loss: {who} needs at least {need} classes, the model gives {logits.shape[1]}; "
            "use ce or margin"
        )
    return logits.sort(dim=1, descending=True).values


def dlr(logits: Tensor, labels: Tensor, targeted: bool = False) -> Tensor:
    """Difference of logits ratio (Croce & Hein, 2020):
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` with ``z_pi`` the sorted logits. Unchanged by
    shifting the logits and by scaling them by a positive factor, so a model's logit scale cannot
    hide a gradient. Targeted: :func:`dlr_targeted`."""
    if targeted:
        return dlr_targeted(logits, labels)
    z = _sorted_logits(logits, 3, "dlr")
    own = logits.gather(1, labels.view(-1, 1)).view(-1)
    return (other_max(logits, labels) - own) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, labels: Tensor, targeted: bool = True) -> Tensor:
    """Targeted DLR towards ``labels``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``.

    The paper's z_y is the true class's logit; here it is the best logit other than the target's,
    which is z_y as long as the sample is still classified as y (the only case the paper's
    attack sees) and the margin to beat after that. ``targeted=False`` reads ``labels`` as the
    true classes and uses the untargeted numerator with this scale.
    """
    z = _sorted_logits(logits, 4, "dlr_targeted")
    own = logits.gather(1, labels.view(-1, 1)).view(-1)
    gap = own - other_max(logits, labels)
    scale = z[:, 0] - (z[:, 2] + z[:, 3]) / 2 + 1e-12
    return (gap if targeted else -gap) / scale


LOSSES: dict[str, LossFn] = {"ce": ce, "margin": margin, "dlr": dlr, "dlr_targeted": dlr_targeted}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(f"loss: expected one of {sorted(LOSSES)}, got {name!r}") from None
