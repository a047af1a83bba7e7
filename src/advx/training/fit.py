"""One fit loop: no trainer framework, deterministic with a seed, resumable, data-parallel.

    history = fit(net, x, y, loss=fgsm_rs(0.3), batch_size=100,
                  schedule=Schedule(epochs=10, lr=5e-3, lr_schedule="cyclic"),
                  checkpoint=Checkpointing("runs/fgsm"))
    history = fit(net, loader, loss=pgd_at(8 / 255), augment="crop-flip", out="runs/pgd")

The data may be tensors, a Dataset or a DataLoader (:mod:`advx.training.feed`). What happens,
in order, every epoch: the data order comes from a ``DistributedSampler`` seeded with
``seed + epoch`` (one process or K, see :mod:`advx.training.distributed`; a DataLoader's own
sampler is seeded from (seed, epoch)); for every batch the learning rate is set from the
schedule, the batch is augmented when asked, the recipe gives one loss per sample, their mean
over the global batch is back-propagated and the optimizer steps. After the epoch the monitor
(:mod:`advx.training.monitor`) scores its held-out set and checks for catastrophic overfitting,
and the saver (:mod:`advx.training.saver`) writes a checkpoint and the training curve
(:mod:`advx.training.plot`).

Determinism: the weights after ``fit`` depend only on the initial weights, the data, the
arguments and ``seed`` (bit for bit on a CPU). The global torch RNG (dropout) is re-seeded from
(seed, epoch, rank) at the start of every epoch inside a forked RNG, so the caller's RNG state
is left as it was and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._progress import Bar
from .._rng import derive_seed
from .._state import evaluating, restore_modes, training_modes
from .._validate import positive_int
from ..errors import AdvxError, InputError
from .distributed import Group, batches, check_batch_size, current_group, wrap
from .feed import Source, as_source, augment_rng, check_augment, crop_flip
from .losses import Batch, Recipe, Step, standard
from .monitor import Monitor, MonitorData, Watch, restore, split_monitor, state_copy
from .options import Precision, Schedule, lr_at, record, settings
from .plot import CURVE_FILE, draw_curve
from .saver import Checkpointing, History, Saver

__all__ = [
    "fit",
    "History",
    "TrainingError",
    "lr_at",
    "Schedule",
    "Precision",
    "Monitor",
    "Checkpointing",
]

# recipes that never see the clean batch: its accuracy is sampled every 10th batch
_CLEAN_EVERY = 10


class TrainingError(AdvxError, FloatingPointError):
    """Training had to stop (the loss became NaN or infinite). ``history`` holds the epochs done;
    the model holds the weights of the last good epoch, and so does the checkpoint on disk."""

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


def fit(
    model: Any,
    x: Tensor | Dataset | DataLoader,
    y: Tensor | None = None,
    *,
    loss: Recipe | Callable[..., Tensor] | None = None,
    schedule: Schedule | None = None,
    batch_size: int = 128,
    seed: int = 0,
    precision: Precision | None = None,
    monitor: Monitor | MonitorData = "auto",
    checkpoint: Checkpointing | str | Path | None = None,
    augment: str | None = None,
    progress: bool = True,
    desc: str = "train",
    **flat: Any,
) -> History:
    """Train ``model`` in place on (x, y) with the recipe ``loss``; returns a :class:`History`.

    Args:
        model: an ``nn.Module`` returning logits, or an :class:`advx.Classifier` (its bounds and
            normalization are used). Trained where it is (its device); batches are moved there.
        x, y: inputs in the model's bounds (N, ...) and integer labels (N,), on any device;
            or, as ``x`` alone, a ``torch.utils.data.Dataset`` of (image, label) pairs or a
            ``DataLoader`` yielding (images, labels) batches (then ``batch_size`` is the
            loader's own; see :mod:`advx.training.feed` for how each is sampled and seeded).
        loss: a recipe from :mod:`advx.training.losses` (default: ``standard()``), or a plain
            function ``loss(net, x, y)`` returning a scalar or one loss per sample.
        schedule: epochs, optimizer and learning rate (:class:`Schedule`; default one epoch of
            Adam at 1e-3).
        batch_size: the global batch size.
        seed: the data order, the recipes' random starts and dropout all derive from it.
        precision: mixed precision and ``torch.compile`` (:class:`Precision`; default neither).
        monitor: data scored after every epoch and the overfitting check (:class:`Monitor`),
            or just its data: ``(x, y)``, a number of training samples to hold out, None or
            ``"auto"``.
        checkpoint: a checkpoint after every epoch, and resuming (:class:`Checkpointing`, or
            just its folder); None: nothing is written. A ``training-curve.png`` (loss, clean
            and robust accuracy per epoch) is drawn beside it when matplotlib is installed.
        augment: ``"crop-flip"``: a random crop of the image padded by 4 pixels and a random
            horizontal flip per sample, on the device (the CIFAR-10 recipe); None: none.
        progress: a progress bar (loss, clean and adversarial accuracy on the batch, ETA) on an
            interactive terminal; ``ADVX_PROGRESS=0/1`` overrides.
        **flat: any field of the settings by its name, as a shorthand (``epochs=10, lr=5e-3,
            out="runs/a"``; ``monitor_steps`` is :attr:`Monitor.steps`); it overrides the
            field of the setting passed.

    Under ``torchrun`` (the process group initialized), every process calls ``fit`` with the same
    arguments and data: the model is wrapped in DistributedDataParallel, each process takes its
    share of every global batch of ``batch_size``, and rank 0 writes the checkpoints.

    Raises:
        TrainingError: the loss became NaN or infinite (the message names the epoch and batch).
    """
    sched, prec, mon, ckpt = settings(schedule, precision, monitor, checkpoint, flat)
    positive_int(batch_size, name="batch_size", who="fit")
    recipe = _as_recipe(loss)
    clf, net = _split_model(model)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise InputError("fit: the model has no trainable parameters")
    bounds = clf.bounds if clf is not None else (0.0, 1.0)
    recipe.check(bounds)
    aug = check_augment(augment)
    source = as_source(x, y, bounds)
    group = current_group()
    if not source.indexable:
        if group.distributed:
            raise InputError(
                "fit: under torchrun pass the Dataset, not a DataLoader: fit splits each global "
                "batch across the processes itself"
            )
        batch_size = source.loader.batch_size or batch_size
    check_batch_size(group, batch_size)
    device, pdtype = params[0].device, params[0].dtype
    normalize = clf.preprocess if clf is not None else (lambda t: t)
    adapt = clf.logits_of if clf is not None else _logits_of
    num_classes = _num_classes(net, normalize, adapt, source.first().to(device, pdtype))
    if source.y is not None:
        _check_classes(source.y, num_classes)
    overfit = recipe.overfit_check if mon.overfit_check is None else bool(mon.overfit_check)
    if overfit and recipe.threat is None:
        raise InputError(
            f"fit: overfit_check needs a recipe with a threat model; {recipe.name} has none"
        )
    train_rows, held = split_monitor(mon.data, source, seed, wants=overfit)
    if overfit and held is None:
        raise InputError(
            "fit: overfit_check needs monitor data: pass monitor=(x, y) or a number of samples "
            "to hold out"
        )
    if train_rows is not None and not train_rows.numel():
        raise InputError("fit: no training samples left after holding out the monitor set")

    opt = sched.optimizer_for(params)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.autocast is torch.float16)
    watch = Watch(
        mon, held, overfit=overfit, net=net, clf=clf, recipe=recipe, seed=seed, group=group
    )
    config = record(recipe, sched, prec, mon, batch_size, seed, held, overfit, aug)
    saver = None
    if ckpt is not None:
        saver = Saver(
            ckpt,
            net=net,
            clf=clf,
            recipe=recipe,
            config=config,
            data=source.fingerprint(),
            group=group,
        )

    history = History()
    start_epoch, step = 0, 0
    if saver is not None and ckpt is not None and ckpt.resume:
        restored = saver.restore(opt, scaler)
        if restored is not None:
            history, start_epoch, step, watch.best = restored
            history.resumed_from = start_epoch
            if history.stopped or start_epoch >= sched.epochs:
                return history

    was_training = training_modes(net)
    forward, craft = _forwards(net, device, group, prec, normalize, adapt, batch_size)
    loop = _Loop(
        net=net,
        device=device,
        dtype=pdtype,
        source=source,
        rows=train_rows,
        num_classes=num_classes,
        augment=aug,
        recipe=recipe,
        schedule=sched,
        batch_size=batch_size,
        seed=seed,
        group=group,
        opt=opt,
        scaler=scaler,
        forward=forward,
        craft=craft,
        bounds=bounds,
        grad_scale=1024.0 if prec.autocast is torch.float16 else 1.0,
        out=None if ckpt is None else ckpt.out,
    )
    started = time.perf_counter()
    seconds_before = history.seconds
    total = (sched.epochs - start_epoch) * loop.steps_per_epoch if progress and group.main else 0
    bar = Bar(total=total, desc=desc, unit="batch")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for epoch in range(start_epoch, sched.epochs):
                bar.describe(f"{desc} {epoch + 1}/{sched.epochs}")
                t0 = time.perf_counter()
                rate, sums, step = loop.epoch(epoch, step, history, bar)
                row = _epoch_row(epoch, rate, sums, time.perf_counter() - t0)
                row.update(watch.score(epoch))
                history.epochs.append(row)
                stop = watch.check(row)
                if stop:
                    history.stopped, history.best_epoch = stop, watch.best["epoch"]
                history.seconds = seconds_before + time.perf_counter() - started
                if saver is not None:
                    path = saver.save(epoch + 1, step, opt, scaler, history, watch.best)
                    history.checkpoint = str(path)
                    if group.main:
                        draw_curve(history, Path(path).parent / CURVE_FILE)
                bar.write(_epoch_line(row, stop))
                if stop:
                    break
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)  # leave no gradients on the weights
        restore_modes(was_training)
    history.seconds = seconds_before + time.perf_counter() - started
    return history


def _as_recipe(loss: Recipe | Callable[..., Tensor] | None) -> Recipe:
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
    fn = loss

    def run(b: Batch) -> Step:
        value = fn(b.model, b.x, b.y)
        if value.dim() == 0:
            value = value.expand(b.x.shape[0])  # a batch mean: the same value for every sample
        return Step(value)

    return Recipe(getattr(loss, "__name__", "custom"), {}, run)


def _split_model(model: Any) -> tuple[Any, nn.Module]:
    """(the Classifier or None, the module to train)."""
    from ..models import Classifier

    clf = model if isinstance(model, Classifier) else None
    net = model.net if clf is not None else model
    if not isinstance(net, nn.Module):
        raise InputError(
            f"fit: model must be an nn.Module or an advx.Classifier, got {type(model).__name__}"
        )
    return clf, net


def _check_classes(y: Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"fit: the labels run from {int(y.min())} to {int(y.max())} but the model gives "
            f"{num_classes} classes; labels must lie in 0..{num_classes - 1}"
        )


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


def _num_classes(net: nn.Module, normalize: Callable, adapt: Callable, x1: Tensor) -> int:
    with evaluating(net, no_grad=True):
        logits = adapt(net(normalize(x1)))
    if logits.dim() != 2:
        raise InputError(
            f"fit: expected logits of shape (N, classes) from the model, got {tuple(logits.shape)}"
        )
    return int(logits.shape[1])


# ---- the loop ----------------------------------------------------------------------------------
Forward = Callable[[Tensor], Tensor]


def _forwards(
    net: nn.Module,
    device: torch.device,
    group: Group,
    prec: Precision,
    normalize: Callable,
    adapt: Callable,
    batch_size: int,
) -> tuple[Forward, Forward]:
    """The training forward pass (through DDP under torchrun) and the crafting one (the bare
    module), each under autocast and ``torch.compile`` when asked."""
    train_mod = wrap(group, net)
    train_fast: Callable | None = None
    craft_fast: Callable | None = None
    if prec.compile:
        backend = {} if prec.compile is True else {"backend": str(prec.compile)}
        train_fast = torch.compile(train_mod, **backend)  # type: ignore[call-overload]
        craft_fast = (
            torch.compile(net, **backend)  # type: ignore[call-overload]
            if group.distributed
            else train_fast
        )
    autocast = prec.autocast
    amp = (
        (lambda: torch.autocast(device.type, dtype=autocast))
        if autocast is not None
        else contextlib.nullcontext
    )
    full_rows = batch_size // group.world

    def runner(mod: nn.Module, fast: Callable | None) -> Forward:
        def forward(inp: Tensor) -> Tensor:
            # The compiled module sees one shape only, the full batch: with torch 2.13's inductor
            # (CPU, one thread) the gradients of a compiled module came out all zero, for every
            # shape, once it had been recompiled for a second one -- a short last batch would
            # have silently ended the training. Other shapes run eagerly.
            use = fast if fast is not None and inp.shape[0] == full_rows else mod
            with amp():
                logits = adapt(use(normalize(inp)))
            return logits if logits.dtype == inp.dtype else logits.to(inp.dtype)

        return forward

    return runner(train_mod, train_fast), runner(net, craft_fast)


@dataclass
class _Loop:
    """One epoch of optimizer steps; everything fixed for the run."""

    net: nn.Module
    device: torch.device  # where the trainable weights are, and their dtype: batches go there
    dtype: torch.dtype
    source: Source
    rows: Tensor | None  # the rows trained on (the monitor's are held out); None: a DataLoader
    num_classes: int
    augment: str | None
    recipe: Recipe
    schedule: Schedule
    batch_size: int
    seed: int
    group: Group
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    forward: Forward
    craft: Forward
    bounds: tuple[float, float]
    grad_scale: float
    out: str | Path | None

    @property
    def steps_per_epoch(self) -> int:
        if self.rows is None:
            return len(self.source.loader)
        return -(-self.rows.numel() // self.batch_size)

    def feed(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
        """This process's batches of ``epoch``: (sample ids, x, y, size of the global batch);
        x and y on the CPU or wherever the data is."""
        if self.rows is None:  # a DataLoader: its batches are numbered in the order they come
            seen = 0
            for xb, yb in self.source.stream(self.seed, epoch):
                _check_classes(yb, self.num_classes)
                k = xb.shape[0]
                yield torch.arange(seen, seen + k), xb, yb, k
                seen += k
            return
        order = batches(self.group, self.rows.numel(), self.batch_size, seed=self.seed, epoch=epoch)
        for pos, n_global in order:
            idx = self.rows[pos]
            xb, yb = self.source.take(idx)
            if self.source.y is None:
                _check_classes(yb, self.num_classes)
            yield idx, xb, yb, n_global

    def epoch(self, epoch: int, step: int, history: History, bar: Bar) -> tuple[float, Tensor, int]:
        """Train one epoch: (the learning rate at its end, its summed statistics, the optimizer
        steps done). A non-finite loss puts the epoch's starting weights back and raises."""
        net, group = self.net, self.group
        torch.manual_seed(derive_seed(self.seed, 0xD0, epoch, group.rank))  # dropout
        net.train()
        good = state_copy(net)  # the last good weights, should this epoch blow up
        sums = torch.zeros(6, dtype=torch.float64)  # loss, n, clean ok, clean n, adv ok, adv n
        rate = self.schedule.lr
        for t, (idx, xc, yc, n_global) in enumerate(self.feed(epoch)):
            xb = xc.to(self.device, self.dtype, non_blocking=True)
            yb = yc.to(self.device, non_blocking=True)
            if self.augment is not None:
                rng = augment_rng(self.seed, epoch, idx.to(self.device))
                xb = crop_flip(xb, rng, fill=self.bounds[0])
            rate = self.schedule.lr_at(epoch + (t + 1) / self.steps_per_epoch)
            for g in self.opt.param_groups:
                g["lr"] = rate
            batch = Batch(
                xb,
                yb,
                idx.to(self.device),
                epoch,
                self.seed,
                self.forward,
                self.craft,
                net,
                self.bounds,
                self.grad_scale,
            )
            result = self.recipe(batch)
            per = result.loss
            if per.shape != (xb.shape[0],):
                raise InputError(
                    f"fit: the recipe {self.recipe.name} returned a loss of shape "
                    f"{tuple(per.shape)}, expected one value per sample ({xb.shape[0]},)"
                )
            total = per.sum(dtype=torch.float64 if per.dtype == torch.float64 else torch.float32)
            stats = group.sum(_batch_stats(total, result, batch, t, self.craft))
            if not math.isfinite(float(stats[0])):
                restore(net, good)
                self._blew_up(float(stats[0]), epoch, t, history)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(total * (group.world / n_global)).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            step += 1
            sums += stats
            bar.postfix(_postfix(sums, stats))
            bar.update()
        return rate, sums, step

    def _blew_up(self, value: float, epoch: int, t: int, history: History) -> None:
        kept = "its initial weights"
        if epoch:
            kept = f"the weights of epoch {epoch}, the last good one"
        saved = f", as does the checkpoint in {self.out}" if self.out is not None and epoch else ""
        history.stopped = (
            f"the loss became {value} at epoch {epoch + 1}, batch {t + 1} of "
            f"{self.steps_per_epoch}; the model holds {kept}{saved}"
        )
        raise TrainingError(
            f"fit: {history.stopped}; lower the learning rate or check the data", history
        )


def _batch_stats(total: Tensor, result: Step, batch: Batch, t: int, craft_fn: Forward) -> Tensor:
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
    def ratio(a: int, b: int) -> float | None:
        return None if float(s[b]) == 0 else float(s[a] / s[b])

    return {
        "epoch": epoch + 1,
        "lr": lr,
        "loss": ratio(0, 1),
        "train_clean_accuracy": ratio(2, 3),
        "train_adv_accuracy": ratio(4, 5),
        "seconds": round(seconds, 3),
    }


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
