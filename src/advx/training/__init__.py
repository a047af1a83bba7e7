"""Training: one plain fit loop, recipes as loss functions, checkpoints, data-parallel helpers.

from advx.training import fit, fgsm_rs
history = fit(net, x, y, loss=fgsm_rs(0.3), epochs=10, batch_size=100, lr=5e-3,
              lr_schedule="cyclic", out="runs/fgsm")
model = advx.zoo.load("runs/fgsm")   # a ready advx.Classifier
"""

from .fit import History, TrainingError, fit, lr_at
from .losses import RECIPES, Batch, Recipe, Step, distillation, fgsm_rs, pgd_at, standard, trades

__all__ = [
    "fit",
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
]
