"""One fit loop: no trainer framework, deterministic with a seed, resumable, data-parallel.

    history = fit(net, x, y, loss=fgsm_rs(0.3), epochs=10, batch_size=100, lr=5e-3,
                  lr_schedule="cyclic", out="runs/fgsm")

What happens, in order, every epoch: the data order comes from a ``DistributedSampler`` seeded
with ``seed + epoch`` (one process or K, see :mod:`advx.training.distributed`); for every batch
the learning rate is set from the schedule, the recipe gives one loss per sample, their mean over
the global batch is back-propagated and the optimizer steps. After the epoch: the monitor set is
scored (clean accuracy, and PGD accuracy when the recipe has a threat model), catastrophic
overfitting is checked (FGSM-RS), and with ``out=`` a checkpoint is written.

Determinism: the weights after ``fit`` depend only on the initial weights, the data, the
arguments and ``seed`` (bit for bit on a CPU). The global torch RNG (dropout) is re-seeded from
(seed, epoch, rank) at the start of every epoch inside a forked RNG, so the caller's RNG state
is left as it was and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._progress import Bar, quiet
from .._rng import derive_seed
from .._state import evaluating, restore_modes, training_modes
from .._validate import check_float, fail, nonneg_float, one_of, positive_float, positive_int
from ..errors import AdvxError, InputError
from .distributed import Group, batches, check_batch_size, current_group, wrap
from .losses import Batch, Recipe, Step, standard

__all__ = ["fit", "History", "TrainingError", "lr_at"]

log = logging.getLogger("advx")

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cyclic", "multistep")
_AUTOCAST = {None: None, torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CLEAN_EVERY = (
    10  # recipes that never see the clean batch: its accuracy is sampled every 10th batch
)


class TrainingError(AdvxError, FloatingPointError):
    """Training had to stop (the loss became NaN or infinite). ``history`` holds the epochs done;
    the model holds the weights of the last good epoch, and so does the checkpoint on disk."""

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


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
        return cls(
            **{
                k: d[k]
                for k in (
                    "epochs",
                    "seconds",
                    "stopped",
                    "best_epoch",
                    "resumed_from",
                    "checkpoint",
                )
                if k in d
            }
        )


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
    current = max(
        0, math.ceil(epoch_float - 1e-9) - 1
    )  # a batch ending at e + f, 0 < f <= 1, is in epoch e
    return lr * (0.1 ** sum(1 for m in milestones if current >= m))


# ---- argument checks --------------------------------------------------------------------------
def _check_args(
    epochs, batch_size, lr, optimizer, lr_schedule, autocast, momentum, weight_decay
) -> None:
    positive_int(epochs, name="epochs", who="fit")
    positive_int(batch_size, name="batch_size", who="fit")
    positive_float(lr, name="lr", who="fit")
    one_of(optimizer, OPTIMIZERS, name="optimizer", who="fit")
    one_of(lr_schedule, SCHEDULES, name="lr_schedule", who="fit")
    if autocast not in _AUTOCAST:
        raise fail("fit", "autocast", "torch.bfloat16, torch.float16 or None", autocast)
    check_float(momentum, name="momentum", who="fit", high=1, high_open=True)
    nonneg_float(weight_decay, name="weight_decay", who="fit")


def _as_recipe(loss) -> Recipe:
    """A Recipe, or a plain ``loss(net, x, y) -> Tensor`` (a scalar or one value per sample)."""
    if loss is None:
        return standard()
    if isinstance(loss, Recipe):
        return loss
    if not callable(loss):
        raise InputError(
            f"fit: loss must be a recipe such as advx.training.fgsm_rs(0.3) or a function "
            f"loss(net, x, y), got {type(loss).__name__}"
        )

    def run(b: Batch) -> Step:
        value = loss(b.model, b.x, b.y)
        if value.dim() == 0:
            value = value.expand(b.x.shape[0])  # a batch mean: the same value for every sample
        return Step(value)

    return Recipe(getattr(loss, "__name__", "custom"), {}, run)


# ---- the loop ----------------------------------------------------------------------------------
def fit(
    model,
    x: Tensor,
    y: Tensor,
    *,
    loss: Recipe | Callable | None = None,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    milestones: tuple[int, ...] | None = None,
    seed: int = 0,
    autocast: torch.dtype | None = None,
    compile: bool | str = False,
    progress: bool = True,
    desc: str = "train",
    monitor: int | tuple[Tensor, Tensor] | str | None = "auto",
    monitor_steps: int = 10,
    overfit_check: bool | None = None,
    overfit_drop: float = 0.2,
    overfit_floor: float | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    model_spec: str | dict | None = None,
    data_name: str | None = None,
) -> History:
    """Train ``model`` in place on (x, y) with the recipe ``loss``; returns a :class:`History`.

    Args:
        model: an ``nn.Module`` returning logits, or an :class:`advx.Classifier` (its bounds and
            normalization are used). Trained where it is (its device); batches are moved there.
        x, y: inputs in the model's bounds (N, ...) and integer labels (N,), on any device.
        loss: a recipe from :mod:`advx.training.losses` (default: ``standard()``), or a plain
            function ``loss(net, x, y)`` returning a scalar or one loss per sample.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``); ``weight_decay`` for both.
        lr_schedule: ``"constant"``, ``"cyclic"`` (Wong et al.: up to ``lr`` at 2/5 of the
            epochs and down to 0, updated every batch) or ``"multistep"`` (x0.1 at each of
            ``milestones``, default half and three quarters of the epochs).
        seed: the data order, the recipes' random starts and dropout all derive from it.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run the forward passes in mixed
            precision (float16 with a gradient scaler); None for full precision.
        compile: run the model through ``torch.compile`` (True: the default backend, inductor;
            a string names another backend, e.g. ``"aot_eager"``).
        progress: a progress bar (loss, clean and adversarial accuracy on the batch, ETA) on an
            interactive terminal; ``ADVX_PROGRESS=0/1`` overrides.
        monitor: data scored after every epoch: ``(x, y)``, an int k (k training samples,
            chosen by ``seed``, are held out of training for it), None, or ``"auto"`` (512
            samples, at most a tenth of the data, held out when the recipe checks overfitting).
        monitor_steps: PGD steps for the monitor's adversarial accuracy.
        overfit_check: watch for catastrophic overfitting (default: when the recipe asks, i.e.
            FGSM-RS): when the monitor's PGD accuracy drops more than ``overfit_drop`` below the
            best epoch's, or under ``overfit_floor`` after the best epoch was above it, the best
            epoch's weights are restored and training stops (``History.stopped`` says so).
        out: a folder for checkpoints: one after every epoch (weights, sidecar, resume state).
        resume: continue from the checkpoint in ``out`` (when there is one): a run stopped after
            epoch k and resumed ends with the weights an uninterrupted run would have.
        model_spec: how to rebuild the architecture (e.g. ``"lenet"`` or
            ``{"spec": "pkg.mod:make", "kwargs": {...}}``), recorded in the checkpoint for
            :func:`advx.zoo.load`; for a built-in architecture it is read off the module
            (:func:`advx.zoo.describe`).

    Under ``torchrun`` (the process group initialized), every process calls ``fit`` with the same
    arguments and data: the model is wrapped in DistributedDataParallel, each process takes its
    share of every global batch of ``batch_size``, and rank 0 writes the checkpoints.

    Raises:
        TrainingError: the loss became NaN or infinite (the message names the epoch and batch).
    """
    from ..models import Classifier

    _check_args(epochs, batch_size, lr, optimizer, lr_schedule, autocast, momentum, weight_decay)
    recipe = _as_recipe(loss)
    clf = model if isinstance(model, Classifier) else None
    net = model.net if clf is not None else model
    if not isinstance(net, nn.Module):
        raise InputError(
            f"fit: model must be an nn.Module or an advx.Classifier, got {type(model).__name__}"
        )
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise InputError("fit: the model has no trainable parameters")
    bounds = clf.bounds if clf is not None else (0.0, 1.0)
    recipe.check(bounds)
    x, y = _check_data(x, y, bounds)
    group = current_group()
    check_batch_size(group, batch_size)
    device, pdtype = params[0].device, params[0].dtype
    normalize = clf.preprocess if clf is not None else (lambda t: t)
    adapt = clf.logits_of if clf is not None else _logits_of
    num_classes = _num_classes(net, normalize, adapt, x[:1].to(device, pdtype))
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise InputError(
            f"fit: the labels run from {int(y.min())} to {int(y.max())} but the model gives "
            f"{num_classes} classes; labels must lie in 0..{num_classes - 1}"
        )
    overfit = recipe.overfit_check if overfit_check is None else bool(overfit_check)
    if overfit and recipe.threat is None:
        raise InputError(
            f"fit: overfit_check needs a recipe with a threat model; {recipe.name} has none"
        )
    train_rows, mon = _split_monitor(monitor, x, y, seed, wants=overfit)
    if overfit and mon is None:
        raise InputError(
            "fit: overfit_check needs monitor data: pass monitor=(x, y) or a number of samples to hold out"
        )
    if not train_rows.numel():
        raise InputError("fit: no training samples left after holding out the monitor set")
    n = train_rows.numel()
    steps_per_epoch = -(-n // batch_size)
    if milestones is None:
        milestones = (epochs // 2, (3 * epochs) // 4) if lr_schedule == "multistep" else ()
    milestones = tuple(int(m) for m in milestones)

    opt = (
        torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast is torch.float16)

    config = {
        "recipe": recipe.to_dict(),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": float(lr),
        "optimizer": optimizer,
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "lr_schedule": lr_schedule,
        "milestones": list(milestones),
        "seed": int(seed),
        "autocast": _AUTOCAST[autocast],
        "monitor": None if mon is None else int(mon[0].shape[0]),
        "overfit_check": overfit,
        "overfit_drop": overfit_drop,
        "overfit_floor": overfit_floor,
    }
    saver = (
        _Saver(out, net, clf, recipe, config, model_spec, x, y, data_name, group)
        if out is not None
        else None
    )

    history = History()
    start_epoch, step = 0, 0
    best: dict[str, Any] = {"epoch": None, "accuracy": -1.0, "weights": None}
    if saver is not None and resume:
        restored = saver.restore(opt, scaler)
        if restored is not None:
            history, start_epoch, step, best = restored
            history.resumed_from = start_epoch
            if history.stopped or start_epoch >= epochs:
                return history

    was_training = training_modes(net)
    train_mod = wrap(group, net)
    craft_mod: nn.Module = net
    train_fast = craft_fast = None
    if compile:
        opts = {} if compile is True else {"backend": str(compile)}
        train_fast = torch.compile(train_mod, **opts)
        craft_fast = torch.compile(net, **opts) if group.distributed else train_fast
    amp = (
        (lambda: torch.autocast(device.type, dtype=autocast))
        if autocast is not None
        else contextlib.nullcontext
    )
    full_rows = batch_size // group.world

    def runner(mod: nn.Module, fast: Callable | None) -> Callable[[Tensor], Tensor]:
        def forward(inp: Tensor) -> Tensor:
            # The compiled module sees one shape only, the full batch: with torch 2.13's inductor
            # (CPU, one thread) the gradients of a compiled module came out all zero, for every shape, once
            # it had been recompiled for a second one -- a short last batch would have silently
            # ended the training. Other shapes run eagerly.
            use = fast if fast is not None and inp.shape[0] == full_rows else mod
            with amp():
                logits = adapt(use(normalize(inp)))
            return logits if logits.dtype == inp.dtype else logits.to(inp.dtype)

        return forward

    model_fn, craft_fn = runner(train_mod, train_fast), runner(craft_mod, craft_fast)
    grad_scale = 1024.0 if autocast is torch.float16 else 1.0
    started = time.perf_counter()
    seconds_before = history.seconds
    rng_devices = [device] if device.type == "cuda" else []
    bar = Bar(
        total=(epochs - start_epoch) * steps_per_epoch if progress and group.main else 0,
        desc=desc,
        unit="batch",
    )
    try:
        with torch.random.fork_rng(devices=rng_devices):
            for epoch in range(start_epoch, epochs):
                torch.manual_seed(
                    derive_seed(seed, 0xD0, epoch, group.rank)
                )  # dropout: (seed, epoch, rank)
                net.train()
                good = _state_copy(net)  # the last good weights, should this epoch blow up
                t0 = time.perf_counter()
                sums = torch.zeros(
                    6, dtype=torch.float64
                )  # loss, n, clean ok, clean n, adv ok, adv n
                bar.describe(f"{desc} {epoch + 1}/{epochs}")
                for t, (pos, n_global) in enumerate(
                    batches(group, n, batch_size, seed=seed, epoch=epoch)
                ):
                    idx = train_rows[pos]
                    xb = x[idx].to(device, pdtype, non_blocking=True)
                    yb = y[idx].to(device, non_blocking=True)
                    rate = lr_at(
                        lr_schedule, lr, epoch + (t + 1) / steps_per_epoch, epochs, milestones
                    )
                    for g in opt.param_groups:
                        g["lr"] = rate
                    batch = Batch(
                        xb,
                        yb,
                        idx.to(device),
                        epoch,
                        seed,
                        model_fn,
                        craft_fn,
                        net,
                        bounds,
                        grad_scale,
                    )
                    result = recipe(batch)
                    per = result.loss
                    if per.shape != (xb.shape[0],):
                        raise InputError(
                            f"fit: the recipe {recipe.name} returned a loss of shape {tuple(per.shape)}, "
                            f"expected one value per sample ({xb.shape[0]},)"
                        )
                    total = per.sum(
                        dtype=torch.float64 if per.dtype == torch.float64 else torch.float32
                    )
                    stats = _batch_stats(total, result, batch, t, craft_fn)
                    stats = group.sum(stats)
                    if not math.isfinite(float(stats[0])):
                        _restore(net, good)
                        kept = (
                            f"the weights of epoch {epoch}, the last good one"
                            if epoch
                            else "its initial weights"
                        )
                        history.stopped = (
                            f"the loss became {float(stats[0])} at epoch {epoch + 1}, batch {t + 1} of "
                            f"{steps_per_epoch}; the model holds {kept}"
                            + (
                                f", as does the checkpoint in {out}"
                                if out is not None and epoch
                                else ""
                            )
                        )
                        raise TrainingError(
                            f"fit: {history.stopped}; lower the learning rate or check the data",
                            history,
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(total * (group.world / n_global)).backward()
                    scaler.step(opt)
                    scaler.update()
                    step += 1
                    sums += stats
                    bar.postfix(_postfix(sums, stats))
                    bar.update()
                row = _epoch_row(epoch, rate, sums, time.perf_counter() - t0)
                if mon is not None:
                    row.update(
                        _score_monitor(net, clf, mon, recipe, seed, epoch, monitor_steps, group)
                    )
                history.epochs.append(row)
                stop = None
                if overfit:
                    acc = row["monitor_adv_accuracy"]
                    # a collapse: far below the best epoch, or under the floor after having been above it
                    fell = acc < best["accuracy"] - overfit_drop
                    under = overfit_floor is not None and best["accuracy"] >= overfit_floor > acc
                    if fell or under:
                        rule = (
                            f"more than {overfit_drop:.0%} below"
                            if fell
                            else f"under the floor of {overfit_floor:.0%}, from"
                        )
                        stop = (
                            f"catastrophic overfitting at epoch {epoch + 1}: PGD accuracy on the "
                            f"{mon[0].shape[0]} monitor samples fell to {acc:.1%}, {rule} {best['accuracy']:.1%} "
                            f"at epoch {best['epoch']}; rolled back to epoch {best['epoch']} and stopped"
                        )
                        _restore(net, best["weights"])
                        history.stopped, history.best_epoch = stop, best["epoch"]
                        log.warning("fit: %s", stop)
                    elif acc > best["accuracy"]:
                        best = {"epoch": epoch + 1, "accuracy": acc, "weights": _state_copy(net)}
                history.seconds = seconds_before + time.perf_counter() - started
                if saver is not None:
                    history.checkpoint = str(
                        saver.save(epoch + 1, step, opt, scaler, history, best)
                    )
                bar.write(_epoch_line(row, stop))
                if stop:
                    break
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)  # leave no gradients on the weights
        restore_modes(was_training)
    history.seconds = seconds_before + time.perf_counter() - started
    return history


# ---- pieces of the loop -----------------------------------------------------------------------
def _logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    raise InputError(
        f"fit: the model returned a {type(out).__name__}, not logits; wrap it in an "
        "advx.Classifier with output= to say where the logits are"
    )


def _check_data(x, y, bounds) -> tuple[Tensor, Tensor]:
    from .._validate import check_images, check_labels

    x = check_images(x, bounds)
    if x.shape[0] == 0:
        raise InputError("fit: no training samples")
    y = check_labels(y, x.shape[0], x.device)
    return x, y


def _num_classes(net: nn.Module, normalize, adapt, x1: Tensor) -> int:
    with evaluating(net, no_grad=True):
        logits = adapt(net(normalize(x1)))
    if logits.dim() != 2:
        raise InputError(
            f"fit: expected logits of shape (N, classes) from the model, got {tuple(logits.shape)}"
        )
    return int(logits.shape[1])


def _split_monitor(monitor, x: Tensor, y: Tensor, seed: int, *, wants: bool):
    """(rows of x to train on, monitor (x, y, global ids) or None)."""
    n = x.shape[0]
    everything = torch.arange(n)
    if monitor is None or (monitor == "auto" and not wants):
        return everything, None
    if isinstance(monitor, tuple):
        mx, my = monitor
        return everything, (mx, my, torch.arange(mx.shape[0]) + n)  # ids past the training set's
    k = min(512, n // 10) if monitor == "auto" else monitor
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n:
        raise InputError(
            f"fit: monitor must be (x, y), a number of samples in 1..{n - 1} to hold out, 'auto' "
            f"or None, got {monitor!r}"
        )
    gen = torch.Generator().manual_seed(derive_seed(seed, 0x40A1))
    order = torch.randperm(n, generator=gen)
    held = order[n - k :].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    held_dev = held.to(x.device)
    return everything[keep], (x[held_dev], y[held_dev], held)


def _batch_stats(total: Tensor, result: Step, batch: Batch, t: int, craft_fn) -> Tensor:
    yb = batch.y
    out = torch.zeros(6, dtype=torch.float64)
    out[0] = float(total.detach())
    out[1] = yb.shape[0]
    clean = result.logits
    if clean is None and t % _CLEAN_EVERY == 0:
        with batch.eval_mode(), torch.no_grad():
            clean = craft_fn(batch.x)
    if clean is not None:
        out[2] = float((clean.detach().argmax(1) == yb).sum())
        out[3] = yb.shape[0]
    if result.adv_logits is not None:
        out[4] = float((result.adv_logits.detach().argmax(1) == yb).sum())
        out[5] = yb.shape[0]
    return out


def _epoch_row(epoch: int, lr: float, s: Tensor, seconds: float) -> dict[str, Any]:
    ratio = lambda a, b: None if float(s[b]) == 0 else float(s[a] / s[b])
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "loss": ratio(0, 1),
        "train_clean_accuracy": ratio(2, 3),
        "train_adv_accuracy": ratio(4, 5),
        "seconds": round(seconds, 3),
    }


def _score_monitor(
    net: nn.Module, clf, mon, recipe: Recipe, seed: int, epoch: int, steps: int, group: Group
) -> dict[str, Any]:
    """Clean accuracy on the monitor set, and PGD accuracy when the recipe has a threat model.
    Split across the processes and summed: every process learns the same numbers."""
    from ..attacks import PGD
    from ..models import Classifier

    mx, my, ids = mon
    rows = group.shard(mx.shape[0]).to(mx.device)
    device = next(net.parameters()).device
    xs, ys, idx = mx[rows].to(device), my[rows].to(device), ids[rows.cpu()].to(device)

    with evaluating(net):
        model = clf if clf is not None else Classifier(net, batch_size=512)
        with torch.no_grad():
            ok = (
                model.predict(xs) == ys
                if xs.shape[0]
                else torch.zeros(0, dtype=torch.bool, device=device)
            )
        robust = ok.clone()
        if recipe.threat is not None and xs.shape[0]:
            attack = PGD(recipe.threat, steps=steps, seed=derive_seed(seed, 0x3011, epoch))
            with quiet():  # the training bar is enough
                robust &= ~attack(model, xs, ys, index=idx).success
    counts = group.sum(
        torch.tensor(
            [float(ok.sum()), float(robust.sum()), float(xs.shape[0])], dtype=torch.float64
        )
    )
    m = float(counts[2])
    return {
        "monitor_clean_accuracy": float(counts[0]) / m,
        "monitor_adv_accuracy": float(counts[1]) / m if recipe.threat is not None else None,
    }


def _state_copy(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _restore(net: nn.Module, state: dict[str, Tensor] | None) -> None:
    if state is not None:
        net.load_state_dict(state)


def _postfix(sums: Tensor, batch: Tensor) -> dict[str, str]:
    """The bar's running figures: this batch's loss, the epoch's clean and adversarial accuracy."""
    post = {"loss": f"{float(batch[0] / max(1.0, float(batch[1]))):.4f}"}
    if float(sums[3]):
        post["clean"] = f"{float(sums[2] / sums[3]):.1%}"
    if float(sums[5]):
        post["adv"] = f"{float(sums[4] / sums[5]):.1%}"
    return post


def _epoch_line(row: dict[str, Any], stop: str | None) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['loss']:.4f}"]
    for key, name in (
        ("train_clean_accuracy", "clean"),
        ("train_adv_accuracy", "adv"),
        ("monitor_clean_accuracy", "monitor clean"),
        ("monitor_adv_accuracy", "monitor PGD"),
    ):
        if row.get(key) is not None:
            parts.append(f"{name} {row[key]:.1%}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts) + (f"\n{stop}" if stop else "")


class _Saver:
    """Writes and reads the checkpoints of one run (rank 0 writes; every rank reads)."""

    def __init__(
        self, out, net, clf, recipe: Recipe, config, model_spec, x, y, data_name, group: Group
    ) -> None:
        from .._checkpoint import require_safetensors
        from ..data import data_sha256

        require_safetensors()  # fail before training, not after the first epoch
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"fit: out={self.out} is a file; give a folder")
        self.net, self.group, self.config = net, group, config
        from ..zoo import describe

        spec = model_spec if model_spec is not None else describe(net)
        if isinstance(spec, str):
            spec = {"spec": spec, "kwargs": {}}
        cls = type(net)
        self.model = {
            **(spec or {"spec": None, "kwargs": {}}),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "bounds": list(clf.bounds) if clf is not None else [0.0, 1.0],
            "mean": None if clf is None or clf.mean is None else clf.mean.tolist(),
            "std": None if clf is None or clf.std is None else clf.std.tolist(),
        }
        self.recipe = recipe
        self.data = {"sha256": data_sha256(x, y), "n": int(x.shape[0]), "name": data_name}

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

    def save(self, epochs_done: int, step: int, opt, scaler, history: History, best) -> Path:
        from .._checkpoint import SIDECAR, save_checkpoint, state_dict_cpu

        path = self.out / SIDECAR
        if self.group.main:
            state = {
                "config": _jsonish(self.config),
                "epochs_done": epochs_done,
                "step": step,
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "history": _jsonish(history.to_dict()),
                "best": {
                    "epoch": best["epoch"],
                    "accuracy": float(best["accuracy"]),
                    "weights": None
                    if best["weights"] is None
                    else {k: v.cpu() for k, v in best["weights"].items()},
                },
            }
            path = save_checkpoint(
                self.out, state_dict_cpu(self.net), self._meta(epochs_done, history), state
            )
        self.group.barrier()
        return path

    def restore(self, opt, scaler):
        """Load the last checkpoint into the model, the optimizer and the scaler; None when there
        is none. A checkpoint made with other settings is refused, naming them."""
        from .._checkpoint import SIDECAR, load_state, read_sidecar
        from ..zoo import load_weights

        side = self.out / SIDECAR
        if not side.exists():
            log.info("fit: no checkpoint in %s yet; starting from the first epoch", self.out)
            return None
        meta, weights = read_sidecar(side)
        state = load_state(side, meta)
        old = state["config"]
        differ = [
            k for k in self.config if k != "epochs" and old.get(k) != _jsonish(self.config[k])
        ]
        if old.get("epochs") != self.config["epochs"] and self.config["lr_schedule"] != "constant":
            differ.append("epochs")  # the schedule's shape depends on the number of epochs
        if meta.get("data", {}).get("sha256") != self.data["sha256"]:
            differ.append("data")
        if differ:
            raise InputError(
                f"resume: the checkpoint in {self.out} was made with other settings ({', '.join(differ)}); "
                "use the same ones, or another out folder to start afresh"
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


def _jsonish(obj: Any) -> Any:
    """Tuples to lists (what a JSON round trip gives), recursively."""
    if isinstance(obj, dict):
        return {k: _jsonish(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonish(v) for v in obj]
    return obj
