"""The settings of a :func:`advx.training.fit` run that shape the optimization, grouped as small
frozen values checked when they are built:

    fit(net, x, y, loss=fgsm_rs(0.3), batch_size=100,
        schedule=Schedule(epochs=10, lr=5e-3, lr_schedule="cyclic"),
        precision=Precision(autocast=torch.bfloat16))

The monitor's settings are :class:`advx.training.monitor.Monitor`, the checkpoints'
:class:`advx.training.saver.Checkpointing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .._validate import check_float, fail, nonneg_float, one_of, positive_float, positive_int
from ..errors import InputError
from .losses import Recipe
from .monitor import Monitor, MonitorData
from .saver import Checkpointing

__all__ = ["Schedule", "Precision", "lr_at", "settings", "record", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cyclic", "multistep")
AUTOCAST_NAMES = {None: None, torch.bfloat16: "bfloat16", torch.float16: "float16"}

# the flat keywords fit also accepts, shorthand for a field of one of its settings
_FLAT = {
    **{k: ("schedule", k) for k in ("epochs", "lr", "optimizer", "momentum", "weight_decay")},
    **{k: ("schedule", k) for k in ("lr_schedule", "milestones")},
    "autocast": ("precision", "autocast"),
    "compile": ("precision", "compile"),
    "monitor_steps": ("monitor", "steps"),
    **{k: ("monitor", k) for k in ("overfit_check", "overfit_drop", "overfit_floor")},
    **{k: ("checkpoint", k) for k in ("out", "resume", "model_spec", "data_name")},
}


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: ``epochs``, the optimizer (``"adam"``, or ``"sgd"`` with
    ``momentum``; ``weight_decay`` for both) and the learning rate's schedule.

    ``lr_schedule``: ``"constant"``; ``"cyclic"`` (Wong et al.: up to ``lr`` at 2/5 of the epochs
    and down to 0, updated every batch); ``"multistep"`` (x0.1 at each of ``milestones``,
    default half and three quarters of the epochs).
    """

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    milestones: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        positive_int(self.epochs, name="epochs", who="fit")
        positive_float(self.lr, name="lr", who="fit")
        one_of(self.optimizer, OPTIMIZERS, name="optimizer", who="fit")
        check_float(self.momentum, name="momentum", who="fit", high=1, high_open=True)
        nonneg_float(self.weight_decay, name="weight_decay", who="fit")
        one_of(self.lr_schedule, SCHEDULES, name="lr_schedule", who="fit")
        if self.milestones is not None:  # a list is welcome; a frozen value keeps a tuple
            object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    @property
    def milestone_epochs(self) -> tuple[int, ...]:
        """The milestones in use: the given ones, else half and three quarters of the epochs
        for ``multistep`` (none for the other schedules)."""
        if self.milestones is not None:
            return self.milestones
        if self.lr_schedule == "multistep":
            return (self.epochs // 2, (3 * self.epochs) // 4)
        return ()

    def lr_at(self, epoch_float: float) -> float:
        """The learning rate at a fractional epoch (0 .. epochs)."""
        return lr_at(self.lr_schedule, self.lr, epoch_float, self.epochs, self.milestone_epochs)

    def optimizer_for(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


@dataclass(frozen=True)
class Precision:
    """How the passes run: ``autocast`` (``torch.bfloat16`` or ``torch.float16``: forward passes
    in mixed precision, float16 with a gradient scaler; None: full precision) and ``compile``
    (run the model through ``torch.compile``; True: the default backend, inductor; a string
    names another backend, e.g. ``"aot_eager"``)."""

    autocast: torch.dtype | None = None
    compile: bool | str = False

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_NAMES:
            raise fail("fit", "autocast", "torch.bfloat16, torch.float16 or None", self.autocast)
        if not isinstance(self.compile, (bool, str)):
            raise fail("fit", "compile", "True, False or a backend name", self.compile)

    @property
    def autocast_name(self) -> str | None:
        return AUTOCAST_NAMES[self.autocast]


def lr_at(
    schedule: str, lr: float, epoch_float: float, epochs: int, milestones: tuple[int, ...] = ()
) -> float:
    """The learning rate at a fractional epoch (0 .. epochs).

    ``constant``: ``lr``. ``cyclic``: Wong et al.'s triangle, from 0 up to ``lr`` at 2/5 of the
    epochs and back down to 0 at the end. ``multistep``: ``lr`` times 0.1 for each milestone
    epoch passed (default: half and three quarters of the epochs).
    """
    if schedule == "constant":
        return lr
    if schedule == "cyclic":
        peak = 0.4 * epochs
        if epoch_float <= peak:
            return lr * epoch_float / peak
        return max(0.0, lr * (epochs - epoch_float) / (epochs - peak))
    # a batch ending at e + f, 0 < f <= 1, is in epoch e
    current = max(0, math.ceil(epoch_float - 1e-9) - 1)
    return lr * (0.1 ** sum(1 for m in milestones if current >= m))


# ---- the settings of one run ----------------------------------------------------------
def settings(
    schedule: Schedule | None,
    precision: Precision | None,
    monitor: Monitor | MonitorData,
    checkpoint: Checkpointing | str | Path | None,
    flat: dict[str, Any],
) -> tuple[Schedule, Precision, Monitor, Checkpointing | None]:
    """The four settings, with the flat keywords folded into them."""
    unknown = sorted(set(flat) - set(_FLAT))
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    for name, value, kind in (
        ("schedule", schedule, Schedule),
        ("precision", precision, Precision),
    ):
        if value is not None and not isinstance(value, kind):
            raise InputError(
                f"fit: {name} must be an advx.training.{kind.__name__} or None, "
                f"got {type(value).__name__}"
            )

    def fields(group: str) -> dict[str, Any]:
        return {f: flat[k] for k, (g, f) in _FLAT.items() if g == group and k in flat}

    sched = replace(schedule or Schedule(), **fields("schedule"))
    prec = replace(precision or Precision(), **fields("precision"))
    mon = monitor if isinstance(monitor, Monitor) else Monitor(data=monitor)
    mon = replace(mon, **fields("monitor"))
    if isinstance(checkpoint, (str, Path)):
        checkpoint = Checkpointing(checkpoint)
    elif checkpoint is not None and not isinstance(checkpoint, Checkpointing):
        raise InputError(
            "fit: checkpoint must be an advx.training.Checkpointing, a folder or None, "
            f"got {type(checkpoint).__name__}"
        )
    saving = fields("checkpoint")
    if checkpoint is not None:
        checkpoint = replace(checkpoint, **saving)
    elif saving.get("out") is not None:
        checkpoint = Checkpointing(**saving)
    # without out= nothing is saved: resume, model_spec and data_name alone do nothing
    return sched, prec, mon, checkpoint


def record(
    recipe: Recipe,
    sched: Schedule,
    prec: Precision,
    mon: Monitor,
    batch_size: int,
    seed: int,
    held: Any,
    overfit: bool,
    augment: str | None = None,
) -> dict[str, Any]:
    """What made the run: recorded in the checkpoints and compared on resume."""
    return {
        "recipe": recipe.to_dict(),
        "epochs": sched.epochs,
        "batch_size": batch_size,
        "lr": float(sched.lr),
        "optimizer": sched.optimizer,
        "momentum": float(sched.momentum),
        "weight_decay": float(sched.weight_decay),
        "lr_schedule": sched.lr_schedule,
        "milestones": list(sched.milestone_epochs),
        "seed": int(seed),
        "autocast": prec.autocast_name,
        "monitor": None if held is None else int(held[0].shape[0]),
        "overfit_check": overfit,
        "overfit_drop": mon.overfit_drop,
        "overfit_floor": mon.overfit_floor,
        # recorded only when used: the checkpoints written before augmentation existed resume
        **({"augment": augment} if augment is not None else {}),
    }
