"""The monitor of a fit run: held-out data scored after every epoch (clean accuracy, and PGD
accuracy when the recipe has a threat model), and the check for catastrophic overfitting.

Catastrophic overfitting (Wong et al. 2020): FGSM-RS training can collapse within one epoch to a
model that FGSM no longer hurts and PGD breaks completely. The PGD accuracy on the monitor set
shows it; the watch keeps the best epoch's weights and, on a collapse, puts them back and stops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._progress import quiet
from .._rng import derive_seed
from .._state import evaluating
from .._validate import check_float, positive_int
from ..errors import InputError
from .distributed import Group
from .feed import Source
from .losses import Recipe

__all__ = ["Monitor", "Watch", "split_monitor"]

log = logging.getLogger("advx")

MonitorData = int | tuple[Tensor, Tensor] | str | None
# the monitor set: its inputs, labels and ids (the per-sample streams of its PGD attack)
Held = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: ``data`` may hold tensors
class Monitor:
    """What is scored after every epoch, and when training stops for catastrophic overfitting.

    ``data``: ``(x, y)``, an int k (k training samples, chosen by the seed, are held out of
    training for it), None, or ``"auto"`` (512 samples, at most a tenth of the data, held out
    when the recipe checks overfitting). A DataLoader cannot be split: k (or ``"auto"``) then
    takes the first k samples of a seeded pass over it, trained on as well. ``steps``: PGD
    steps for the adversarial accuracy.
    ``overfit_check`` (default: when the recipe asks, i.e. FGSM-RS): when the monitor's PGD
    accuracy drops more than ``overfit_drop`` below the best epoch's, or under
    ``overfit_floor`` after the best epoch was above it, the best epoch's weights are restored
    and training stops (``History.stopped`` says so).
    """

    data: MonitorData = "auto"
    steps: int = 10
    overfit_check: bool | None = None
    overfit_drop: float = 0.2
    overfit_floor: float | None = None

    def __post_init__(self) -> None:
        positive_int(self.steps, name="monitor_steps", who="fit")
        check_float(self.overfit_drop, name="overfit_drop", who="fit")
        check_float(self.overfit_floor, name="overfit_floor", who="fit", allow_none=True)


def split_monitor(
    data: MonitorData, source: Source, seed: int, *, wants: bool
) -> tuple[Tensor | None, Held | None]:
    """(rows of the data to train on -- None for a DataLoader: all of it --, the monitor set or
    None).

    From tensors or a Dataset the monitor's samples are held out of training. A DataLoader
    cannot be split: an int k (or ``"auto"``) takes the first k samples of a seeded pass over
    it, which are trained on as well -- catastrophic overfitting shows on training samples too
    (PGD accuracy collapses there as well); pass ``monitor=(x, y)`` for a held-out set.
    """
    n = source.n
    everything = None if n is None or not source.indexable else torch.arange(n)
    if data is None or (data == "auto" and not wants):
        return everything, None
    if isinstance(data, tuple):
        mx, my = data
        # ids past the training set's (a DataLoader's batches are numbered from 0 each epoch)
        offset = n if n is not None else 1 << 40
        return everything, (mx, my, torch.arange(mx.shape[0]) + offset)
    if not source.indexable:
        k = (min(512, max(1, n // 10)) if n else 512) if data == "auto" else data
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(
                f"fit: monitor must be (x, y), a number of samples >= 1, 'auto' or None, "
                f"got {data!r}"
            )
        mx, my = source.gather(k, seed)
        return everything, (mx, my, torch.arange(mx.shape[0]) + (1 << 40))
    assert n is not None and everything is not None
    k = min(512, n // 10) if data == "auto" else data
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n:
        raise InputError(
            f"fit: monitor must be (x, y), a number of samples in 1..{n - 1} to hold out, "
            f"'auto' or None, got {data!r}"
        )
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x40A1))
    order = torch.randperm(n, generator=gen)
    held = order[n - k :].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    mx, my = source.take(held)
    return everything[keep], (mx, my, held)


class Watch:
    """Scores the monitor set after each epoch and, when asked, watches for catastrophic
    overfitting. ``best`` (the best epoch, its PGD accuracy and weights) goes into every
    checkpoint, so that a resumed run rolls back as an uninterrupted one would."""

    def __init__(
        self,
        settings: Monitor,
        held: Held | None,
        *,
        overfit: bool,
        net: nn.Module,
        clf: Any,
        recipe: Recipe,
        seed: int,
        group: Group,
    ) -> None:
        self.settings, self.held, self.overfit = settings, held, overfit
        self.net, self.clf, self.recipe, self.seed, self.group = net, clf, recipe, seed, group
        self.best: dict[str, Any] = {"epoch": None, "accuracy": -1.0, "weights": None}

    def score(self, epoch: int) -> dict[str, Any]:
        """Clean accuracy on the monitor set, and PGD accuracy when the recipe has a threat
        model (empty without a monitor set). Split across the processes and summed: every
        process learns the same numbers."""
        if self.held is None:
            return {}
        from ..attacks import PGD
        from ..models import Classifier

        mx, my, ids = self.held
        rows = self.group.shard(mx.shape[0]).to(mx.device)
        device = next(self.net.parameters()).device
        xs, ys, idx = mx[rows].to(device), my[rows].to(device), ids[rows.cpu()].to(device)
        threat = self.recipe.threat

        with evaluating(self.net):
            model = self.clf if self.clf is not None else Classifier(self.net, batch_size=512)
            with torch.no_grad():
                ok = (
                    model.predict(xs) == ys
                    if xs.shape[0]
                    else torch.zeros(0, dtype=torch.bool, device=device)
                )
            robust = ok.clone()
            if threat is not None and xs.shape[0]:
                seed = derive_seed(self.seed, 0x3011, epoch)
                attack = PGD(threat, steps=self.settings.steps, seed=seed)
                with quiet():  # the training bar is enough
                    robust &= ~attack(model, xs, ys, index=idx).success
        counts = self.group.sum(
            torch.tensor(
                [float(ok.sum()), float(robust.sum()), float(xs.shape[0])], dtype=torch.float64
            )
        )
        m = float(counts[2])
        return {
            "monitor_clean_accuracy": float(counts[0]) / m,
            "monitor_adv_accuracy": float(counts[1]) / m if threat is not None else None,
        }

    def check(self, row: dict[str, Any]) -> str | None:
        """After epoch ``row["epoch"]`` was scored: None to go on, or why training stops (the
        best epoch's weights are then back in the model)."""
        if not self.overfit:
            return None
        assert self.held is not None  # fit refuses an overfitting check without monitor data
        s, best = self.settings, self.best
        acc = row["monitor_adv_accuracy"]
        # a collapse: far below the best epoch, or under the floor after having been above it
        fell = acc < best["accuracy"] - s.overfit_drop
        under = s.overfit_floor is not None and best["accuracy"] >= s.overfit_floor > acc
        if fell or under:
            rule = (
                f"more than {s.overfit_drop:.0%} below"
                if fell
                else f"under the floor of {s.overfit_floor:.0%}, from"
            )
            stop = (
                f"catastrophic overfitting at epoch {row['epoch']}: PGD accuracy on the "
                f"{self.held[0].shape[0]} monitor samples fell to {acc:.1%}, {rule} "
                f"{best['accuracy']:.1%} at epoch {best['epoch']}; rolled back to epoch "
                f"{best['epoch']} and stopped"
            )
            restore(self.net, best["weights"])
            log.warning("fit: %s", stop)
            return stop
        if acc > best["accuracy"]:
            self.best = {"epoch": row["epoch"], "accuracy": acc, "weights": state_copy(self.net)}
        return None


def state_copy(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def restore(net: nn.Module, state: dict[str, Tensor] | None) -> None:
    if state is not None:
        net.load_state_dict(state)
