"""The saver of a fit run: its history, a checkpoint after every epoch, and resuming from one.

A checkpoint is the weights and a sidecar (:mod:`advx._checkpoint`: what made the weights, for
:func:`advx.zoo.load`) plus the resume state: the optimizer, the gradient scaler, the history
and the monitor's best epoch. A run stopped after epoch k and resumed ends with the weights an
uninterrupted run would have; a checkpoint made with other settings is refused, naming them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._validate import check_bool
from ..errors import InputError
from .distributed import Group
from .losses import Recipe

__all__ = ["Checkpointing", "History", "Saver"]

log = logging.getLogger("advx")


@dataclass(frozen=True)
class Checkpointing:
    """Where and how a run is saved: ``out``, a folder for one checkpoint after every epoch;
    ``resume``: continue from the checkpoint in ``out`` when there is one.

    ``model_spec``: how to rebuild the architecture (e.g. ``"lenet"`` or
    ``{"spec": "pkg.mod:make", "kwargs": {...}}``), recorded for :func:`advx.zoo.load`; for a
    built-in architecture it is read off the module (:func:`advx.zoo.describe`).
    ``data_name``: a name for the training data, recorded beside its sha256.
    """

    out: str | Path
    resume: bool = False
    model_spec: str | dict[str, Any] | None = None
    data_name: str | None = None

    def __post_init__(self) -> None:
        check_bool(self.resume, name="resume", who="fit")


@dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run.

    Each entry of ``epochs``: ``epoch``, ``lr`` (at the epoch's end), ``loss`` (mean over the
    samples), ``train_clean_accuracy`` and ``train_adv_accuracy`` (on the training batches as
    they were seen; None when the recipe has no such logits), ``monitor_clean_accuracy`` and
    ``monitor_adv_accuracy`` (on the monitor set, PGD for the latter), ``seconds``.
    """

    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None  # why training stopped early (catastrophic overfitting), else None
    best_epoch: int | None = None  # the epoch whose weights were kept after a roll-back
    resumed_from: int | None = None  # epochs already done when this run resumed from a checkpoint
    checkpoint: str | None = None  # the sidecar of the last checkpoint written

    @property
    def last(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        keys = ("epochs", "seconds", "stopped", "best_epoch", "resumed_from", "checkpoint")
        return cls(**{k: d[k] for k in keys if k in d})


class Saver:
    """Writes and reads the checkpoints of one run (rank 0 writes; every rank reads).

    ``config`` is what the run was made with (recorded, and compared on resume)."""

    def __init__(
        self,
        settings: Checkpointing,
        *,
        net: nn.Module,
        clf: Any,
        recipe: Recipe,
        config: dict[str, Any],
        data: dict[str, Any],
        group: Group,
    ) -> None:
        from .._checkpoint import require_safetensors
        from ..zoo import describe

        require_safetensors()  # fail before training, not after the first epoch
        self.out = Path(settings.out)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"fit: out={self.out} is a file; give a folder")
        # a torch.compile'd or (Distributed)DataParallel module: the net is inside, and its
        # weights are saved without the wrapper's key prefix, so that zoo.load rebuilds it
        base = _unwrapped(net)
        self.net, self.group, self.config = base, group, config
        spec = settings.model_spec if settings.model_spec is not None else describe(base)
        if isinstance(spec, str):
            spec = {"spec": spec, "kwargs": {}}
        cls = type(base)
        self.model = {
            **(spec or {"spec": None, "kwargs": {}}),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "bounds": list(clf.bounds) if clf is not None else [0.0, 1.0],
            "mean": None if clf is None or clf.mean is None else clf.mean.tolist(),
            "std": None if clf is None or clf.std is None else clf.std.tolist(),
        }
        self.recipe = recipe
        self.data = {**data, "name": settings.data_name}

    def _meta(self, epochs_done: int, history: History) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": {"name": self.recipe.name, "params": self.recipe.params},
            "threat": None if self.recipe.threat is None else self.recipe.threat.to_dict(),
            "data": self.data,
            "training": {
                **self.config,
                "epochs_done": epochs_done,
                "processes": self.group.world,
                "stopped": history.stopped,
                "best_epoch": history.best_epoch,
                "seconds": round(history.seconds, 3),
            },
            "metrics": history.epochs,
        }

    def save(
        self,
        epochs_done: int,
        step: int,
        opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        history: History,
        best: dict[str, Any],
    ) -> Path:
        from .._checkpoint import SIDECAR, save_checkpoint, state_dict_cpu

        path = self.out / SIDECAR
        if self.group.main:
            kept = best["weights"]
            state = {
                "config": jsonish(self.config),
                "epochs_done": epochs_done,
                "step": step,
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "history": jsonish(history.to_dict()),
                "best": {
                    "epoch": best["epoch"],
                    "accuracy": float(best["accuracy"]),
                    "weights": None if kept is None else {k: v.cpu() for k, v in kept.items()},
                },
            }
            path = save_checkpoint(
                self.out, state_dict_cpu(self.net), self._meta(epochs_done, history), state
            )
        self.group.barrier()
        return path

    def restore(
        self, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> tuple[History, int, int, dict[str, Any]] | None:
        """Load the last checkpoint into the model, the optimizer and the scaler: (history,
        epochs done, optimizer steps done, the monitor's best epoch); None when there is none.
        A checkpoint made with other settings is refused, naming them."""
        from .._checkpoint import SIDECAR, load_state, read_sidecar
        from ..zoo import load_weights

        side = self.out / SIDECAR
        if not side.exists():
            log.info("fit: no checkpoint in %s yet; starting from the first epoch", self.out)
            return None
        meta, weights = read_sidecar(side)
        state = load_state(side, meta)
        old = state["config"]
        keys = [*self.config, *(k for k in old if k not in self.config)]  # either run's
        differ = [k for k in keys if k != "epochs" and old.get(k) != jsonish(self.config.get(k))]
        if old.get("epochs") != self.config["epochs"] and self.config["lr_schedule"] != "constant":
            differ.append("epochs")  # the schedule's shape depends on the number of epochs
        old_data = meta.get("data", {})
        if any(old_data.get(k) != self.data.get(k) for k in ("sha256", "n", "source")):
            differ.append("data")
        if differ:
            raise InputError(
                f"resume: the checkpoint in {self.out} was made with other settings "
                f"({', '.join(differ)}); use the same ones, or another out folder to start afresh"
            )
        load_weights(self.net, weights)  # strict: another architecture is refused, naming the keys
        opt.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = History.from_dict(state["history"])
        b = state["best"]
        device = next(self.net.parameters()).device
        best = {
            "epoch": b["epoch"],
            "accuracy": b["accuracy"],
            "weights": None
            if b["weights"] is None
            else {k: v.to(device) for k, v in b["weights"].items()},
        }
        return history, int(state["epochs_done"]), int(state["step"]), best


def _unwrapped(net: nn.Module) -> nn.Module:
    """The module inside torch.compile's and (Distributed)DataParallel's wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        inner = getattr(net, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            net = inner
        elif isinstance(net, (DataParallel, DistributedDataParallel)):
            net = net.module
        else:
            return net


def jsonish(obj: Any) -> Any:
    """Tuples to lists (what a JSON round trip gives), recursively."""
    if isinstance(obj, dict):
        return {k: jsonish(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonish(v) for v in obj]
    return obj
