"""Training: one plain fit loop, recipes as loss functions, checkpoints, data-parallel helpers.

from advx.training import Checkpointing, Schedule, fgsm_rs, fit
history = fit(net, x, y, loss=fgsm_rs(0.3), batch_size=100,
              schedule=Schedule(epochs=10, lr=5e-3, lr_schedule="cyclic"),
              checkpoint=Checkpointing("runs/fgsm"))
model = advx.zoo.load("runs/fgsm")   # a ready advx.Classifier

In a training loop of one's own, ``recipe_loss("trades", net, eps=8 / 255)`` is the recipe as a
loss ``loss(x, y)``. The loop is :mod:`.fit`, its data and augmentation :mod:`.feed`, the
held-out monitor and the overfitting check :mod:`.monitor`, the checkpoints, resume and history
:mod:`.saver`, the schedule and precision settings :mod:`.options`, the training curve
:mod:`.plot`.
"""

from .fit import TrainingError, fit
from .losses import (
    RECIPES,
    Batch,
    Recipe,
    RecipeLoss,
    Step,
    distillation,
    fgsm_rs,
    pgd_at,
    recipe_loss,
    recipe_name,
    standard,
    trades,
)
from .monitor import Monitor
from .options import Precision, Schedule, lr_at
from .saver import Checkpointing, History

__all__ = [
    "fit",
    "Schedule",
    "Precision",
    "Monitor",
    "Checkpointing",
    "History",
    "TrainingError",
    "lr_at",
    "Recipe",
    "Batch",
    "Step",
    "RECIPES",
    "standard",
    "fgsm_rs",
    "pgd_at",
    "trades",
    "distillation",
    "recipe_loss",
    "recipe_name",
    "RecipeLoss",
]
