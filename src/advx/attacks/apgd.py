"""APGD: Auto-PGD (Croce & Hein, ICML 2020), a step-size-free PGD with momentum.

The step size starts at 2 * eps and is halved, per sample, at the checkpoints of a fixed schedule
when the last stretch of steps went badly; on a halving the sample restarts from its best point.
``loss="dlr-targeted"`` without a target is AutoAttack's APGD-T: an untargeted attack that tries
the most likely other classes one after another. Under L1 it is APGD-L1 (Croce & Hein, ICML 2021,
"Mind the box"): sparse steps whose sparsity follows the best point's, from a sparse start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .._tensor import flat
from .._validate import one_of, positive_int
from ..errors import InputError
from ._base import Attack, Problem, RunOutput
from ._best import Best
from ._lanes import Lanes, masked
from ._losses import LOSSES, LossFn
from ._registry import register
from ._side import cascade, runs_at_once

__all__ = ["APGD", "checkpoints"]

MOMENTUM = 0.75  # alpha of the paper: weight of the new step against the last move


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) at which APGD may halve its step size.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): the stretches between
    checkpoints shrink from 22% to 6% of the run. Computed in hundredths, with integers, so that
    no rounding error moves a checkpoint (0.41 * 100 is 41.000000000000007 in floating point).
    """
    hundredths = [0, 22]
    while True:
        nxt = hundredths[-1] + max(hundredths[-1] - hundredths[-2] - 3, 6)
        if nxt > 100:
            break
        hundredths.append(nxt)
    marks = sorted(
        {-(-h * steps // 100) for h in hundredths}
    )  # ceil(h * steps / 100), deduplicated
    return [w for w in marks if w < steps or w == 0]


@register("apgd")
@dataclass(kw_only=True, eq=False)
class APGD(Attack):
    """Auto-PGD with the cross-entropy (``"ce"``), DLR (``"dlr"``) or targeted DLR loss.

    Per sample: the step size, the count of steps that raised the loss, the best point (highest
    loss) and the checkpoint tests; ``restarts`` random starts, each only on the samples no earlier
    one broke. With ``target=`` the attack aims at that class (targeted CE or targeted DLR).
    ``loss="dlr-targeted"`` without a target is APGD-T: for each sample, the ``targets`` classes
    with the highest clean logits other than the true one are tried in turn, each on the samples
    still unbroken, with untargeted success. ``early_stop`` drops a sample from further passes as
    soon as it is adversarial; without it the sample keeps iterating and its first adversarial
    point is kept.

    L1 follows APGD-L1: each step moves the largest coordinates of the gradient (skipping those the
    box blocks) by eta in total, no momentum, from Gaussian noise projected onto the ball and the
    box; every 4% of the run the share of coordinates moved is set to 1/1.5 of the best point's
    and the step, which starts at eps, shrinks by 1.5 or resets to eps. The paper's optional
    phases at 3 eps and 2 eps are not done.
    """

    loss: str = "ce"
    steps: int = 100
    restarts: int = 1
    targets: int = 9
    rho: float = 0.75
    early_stop: bool = True

    norms = ("linf", "l2", "l1")

    def _check(self) -> None:
        one_of(self.loss, ("ce", "dlr", "dlr-targeted"), name="loss", who="APGD")
        positive_int(self.steps, name="steps", who="APGD")
        positive_int(self.restarts, name="restarts", who="APGD")
        positive_int(self.targets, name="targets", who="APGD")
        if (
            not isinstance(self.rho, (int, float))
            or isinstance(self.rho, bool)
            or not 0 <= self.rho <= 1
        ):
            raise InputError(f"APGD: rho must be a number in [0, 1], got {self.rho!r}")

    def _run(self, p: Problem) -> RunOutput:
        best = Best.highest(p.x)  # over all runs: the first adversarial point, else highest loss
        loss_fn: LossFn = LOSSES[self.loss.replace("-", "_")]
        apgd_t = self.loss == "dlr-targeted" and not p.targeted
        ranked: Tensor | None = None  # APGD-T: per sample, the classes to target in turn
        if apgd_t:
            if p.num_classes < 4:
                raise InputError(
                    "APGD: loss='dlr-targeted' needs at least 4 classes, the model gives "
                    f"{p.num_classes}"
                )
            # classes other than the true one, most likely first (on the clean input)
            clean = p.model.logits(p.x)
            ranked = clean.scatter(1, p.y.view(-1, 1), float("-inf")).argsort(
                dim=1, descending=True
            )
            runs = min(self.targets, p.num_classes - 1)
            loss_fn = partial(loss_fn, targeted=True)
        else:
            runs = 1
            loss_fn = partial(loss_fn, targeted=p.targeted)

        def labels(q: Problem, rows: Tensor, i: int) -> Tensor:
            return q.labels if ranked is None else ranked[rows, i // self.restarts]

        def key(i: int) -> tuple[int, int]:
            """Run i's random-stream key: (restart, target)."""
            k, restart = divmod(i, self.restarts)
            return restart, k

        def run(rows: Tensor, i: int) -> None:
            """Run i: target k (APGD-T), restart r, on the samples ``rows`` still unbroken."""
            k, restart = divmod(i, self.restarts)
            q = p.select(rows)
            desc = f"{p.name} target {k + 1}/{runs}" if apgd_t else p.name
            if self.restarts > 1:
                desc += f" restart {restart + 1}/{self.restarts}"
            x0 = self._start(q, key(i))
            out = self._descend(q, labels(q, rows, i), loss_fn, x0, desc)
            best.offer(rows, out.x, out.score, out.found)

        def side_by_side(q: Problem, rows: Tensor, wide: Problem, group: Sequence[int]) -> Best:
            """Runs ``group`` in one batch: each from its own start, towards its own target."""
            starts = [self._start(q, key(i)) for i in group]
            target = torch.cat([labels(q, rows, i) for i in group])
            desc = f"{p.name} runs {group[0] + 1}-{group[-1] + 1}/{runs * self.restarts}"
            return self._descend(wide, target, loss_fn, torch.cat(starts), desc)

        # targets in turn, restarts within each; on a GPU several runs side by side
        total = runs * self.restarts
        cascade(best, p, total, run, side_by_side, at_once=runs_at_once(p, total))
        return best.output()

    def _start(self, q: Problem, key: tuple[int, int]) -> Tensor:
        """Run ``key`` = (restart, target)'s first point: uniform in the ball, or under L1
        (as APGD-L1 starts sparse) Gaussian noise projected onto the ball and the box."""
        if q.threat.norm == "l1":
            shape = tuple(q.x.shape[1:])
            noise = q.rng.normal(*key, shape=shape, dtype=q.x.dtype).to(q.x.device)
            return q.threat.project(q.x + noise, q.x)
        return q.threat.random_init(q.x, q.rng, *key)

    def _descend(self, q: Problem, labels: Tensor, loss_fn: LossFn, x0: Tensor, desc: str) -> Best:
        """One APGD run from ``x0``. Returns, per sample, the point to keep (the first
        adversarial one, else the one with the highest loss)."""
        n, dev, dtype = len(q), q.x.device, q.x.dtype
        l1 = q.threat.norm == "l1"
        linf = q.threat.norm == "linf"
        if l1:
            # APGD-L1 checks every 4% of the run, as the paper does
            every = max(int(0.04 * self.steps), 1)
            window = {w: every for w in range(every, self.steps, every)}
        else:
            marks = checkpoints(self.steps)
            window = {
                w: w - v for v, w in zip(marks, marks[1:])
            }  # checkpoint -> steps since the last one
        out = Best.highest(x0)
        eps = q.threat.eps_tensor(q.x)
        lowest = torch.full((n,), float("-inf"), device=dev, dtype=dtype)
        # per-sample state of the samples still running; `act` are their positions in q.
        # best_x / best_loss: the highest loss, adversarial or not (the checkpoints restart
        # from it); `out` keeps the first adversarial point instead, for the result.
        s = {
            "x": x0,
            "prev": x0,
            "eta": eps if l1 else 2 * eps,
            "eps": eps,
            "best_x": x0.clone(),
            "best_loss": lowest.clone(),
            "best_grad": torch.zeros_like(x0),
            # step size cut at the last checkpoint
            "reduced": torch.zeros(n, dtype=torch.bool, device=dev),
            "best_at_mark": lowest.clone(),  # best loss at the last checkpoint
            "act": torch.arange(n, device=dev),
            "labels": labels,
        }
        s["eta_b"] = _against(s["eta"], x0)  # the step size against a batch
        # The losses since the last checkpoint, the first of them where the stretch starts from
        # (the checkpoint's, or the best one where the sample restarted): a checkpoint counts the
        # steps that raised the loss from them, once per stretch instead of once per step.
        losses: list[Tensor] = []
        if l1:
            d = x0[0].numel()
            # share of coordinates a step moves
            s["frac"] = torch.full((n,), 0.2, device=dev, dtype=dtype)
            s["nnz_prev"] = torch.full((n,), float(d), device=dev, dtype=dtype)
        # With early_stop, a sample that became adversarial leaves the batch at the next
        # compaction and rides along frozen until then (``lanes.done``): its best point, loss
        # and gradient take nothing more, its passes are not charged. Without it, nothing leaves.
        lanes = Lanes(q, every=None if self.early_stop else 1)
        qa = lanes.start(q)

        # Without early_stop, the run's kept point per running sample (compacted with s), handed
        # to `out` at the end. With early_stop no running sample has been adversarial yet, so
        # the kept point is best_x, which takes the current point where it has just become
        # adversarial (and stops): `out` gets it when rows leave and at the end.
        run = None if self.early_stop else Best.highest(x0)

        def record(x: Tensor, loss: Tensor, adv: Tensor, grad: Tensor | None = None) -> None:
            """Keep the best point (and its gradient) and, with early_stop, the first
            adversarial one, where the row is not frozen. torch.where, not boolean-mask
            writes: no host sync."""
            better = loss > s["best_loss"]
            if run is None:
                # an adversarial point is kept and its row is done; a frozen row takes nothing
                better = masked(better | adv, lanes.done)
                lanes.mark(adv)
            mask = better.view(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, ..., 1)
            if grad is not None:
                s["best_grad"] = torch.where(mask, grad, s["best_grad"])
            s["best_x"] = torch.where(mask, x, s["best_x"])
            s["best_loss"] = torch.where(better, loss, s["best_loss"])
            if run is not None:
                run.update(x, loss, adv)

        for t in q.progress(self.steps, desc):
            x = s["x"]
            loss, grad, logits = qa.model.value_and_grad(x, loss_fn, s["labels"], frozen=lanes.done)
            record(x, loss, qa.is_adversarial(logits), grad)
            losses.append(loss)
            s["grad"] = grad
            if run is None and lanes.due(t):
                found = lanes.done
                keep = lanes.compact()
                if keep is not None:
                    out.offer(s["act"], s["best_x"], s["best_loss"], found)
                    s = {k: v[keep] for k, v in s.items()}
                    losses = [v[keep] for v in losses]
                    qa = qa.select(keep)
                    if keep.numel() == 0:
                        break
            if t in window:
                if l1:
                    restart = self._l1_checkpoint(s, qa.x)
                else:
                    restart = self._checkpoint(s, _ups(losses), window[t])
                s["eta_b"] = _against(s["eta"], s["x"])
                # where the step was cut, go on from the best point, without momentum (no
                # host sync to skip the writes when no sample restarts: they are exact no-ops)
                mask = restart.view(-1, *([1] * (x.dim() - 1)))  # (N,) -> (N, 1, ..., 1)
                s["x"] = torch.where(mask, s["best_x"], s["x"])
                s["prev"] = torch.where(mask, s["best_x"], s["prev"])
                s["grad"] = torch.where(mask, s["best_grad"], s["grad"])
                losses = [torch.where(restart, s["best_loss"], losses[-1])]
            x, eta = s["x"], s["eta_b"]
            if l1:  # a sparse step, no momentum (Croce & Hein, 2021)
                x_next = qa.threat.project(
                    x + eta * _sparse_sign(s["grad"], x, s["frac"], qa.threat.bounds), qa.x
                )
            else:
                # z = P(x + eta s(grad)); x' = P(x + a (z - x) + (1 - a) (x - x_prev));
                # no momentum on the first step
                # Fused where the fused op rounds as the unfused ones: eta * sign(grad) and
                # (1 - a) * (x - x_prev) (a power of two times a float) are exact products, so
                # addcmul and add's alpha, fused multiply-add or not, round the sum only.
                step = qa.threat.steepest_ascent(s["grad"])
                z = qa.threat.project(torch.addcmul(x, eta, step) if linf else x + eta * step, qa.x)
                a = 1.0 if t == 0 else MOMENTUM
                x_next = qa.threat.project(
                    torch.add(x + a * (z - x), x - s["prev"], alpha=1 - a), qa.x
                )
            s["prev"], s["x"] = x, x_next
        else:
            logits = qa.model.logits(s["x"], frozen=lanes.done)  # the last step's point
            record(s["x"], loss_fn(logits, s["labels"]), qa.is_adversarial(logits))
        qa.model.settle()
        if run is not None:
            out.offer(s["act"], run.x, run.score, run.found)
        else:
            found = lanes.done if lanes.done is not None else torch.zeros_like(s["reduced"])
            out.offer(s["act"], s["best_x"], s["best_loss"], found)
        return out

    def _checkpoint(self, s: dict[str, Tensor], ups: Tensor, window: int) -> Tensor:
        """Halve the step where too few of the last ``window`` steps raised the loss (``ups``
        of them did), or where neither the step size nor the best loss changed since the last
        checkpoint."""
        halve = (ups < self.rho * window) | (~s["reduced"] & (s["best_loss"] <= s["best_at_mark"]))
        s["reduced"], s["best_at_mark"] = halve, s["best_loss"].clone()
        s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
        return halve

    @staticmethod
    def _l1_checkpoint(s: dict[str, Tensor], x_clean: Tensor) -> Tensor:
        """APGD-L1: steps move about 1/1.5 of the coordinates the best point changed; where that
        count fell by more than 5%, reset the step to eps and restart from the best point, else
        shrink the step by 1.5 (never below eps / 10)."""
        nnz = (flat(s["best_x"] - x_clean) != 0).sum(dim=1).to(x_clean.dtype)
        restart = nnz < 0.95 * s["nnz_prev"]
        s["frac"] = nnz / x_clean[0].numel() / 1.5
        s["eta"] = (
            torch.where(restart, s["eps"], s["eta"] / 1.5)
            .clamp(min=s["eps"] / 10)
            .minimum(s["eps"])
        )
        s["nnz_prev"] = nnz
        return restart


def _against(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample (N,) value against a batch ``like``: (N, 1, ..., 1), in its dtype."""
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _ups(losses: list[Tensor]) -> Tensor:
    """Per sample, how many of ``losses`` (the first: where the stretch starts) are higher than
    the one before: long (N,), the count a step-by-step ``ups += loss > loss_prev`` keeps."""
    if len(losses) < 2:
        return torch.zeros(losses[0].shape, dtype=torch.long, device=losses[0].device)
    return (torch.stack(losses[1:]) > torch.stack(losses[:-1])).sum(dim=0)


def _sparse_sign(grad: Tensor, x: Tensor, frac: Tensor, bounds: tuple[float, float]) -> Tensor:
    """The sign of the gradient on each sample's ``frac`` share of its largest coordinates, scaled
    to L1 norm 1; coordinates at a bound and pushed further out are skipped (the box undoes
    them)."""
    lo, hi = bounds
    g, xf = flat(grad), flat(x)  # (N, D)
    a = g.abs().masked_fill(((xf <= lo) & (g < 0)) | ((xf >= hi) & (g > 0)), 0.0)
    k = (frac * g.shape[1]).ceil().clamp(1, g.shape[1]).long()
    kth = a.sort(dim=1, descending=True).values.gather(1, (k - 1).view(-1, 1))  # (N, 1)
    pick = (a >= kth) & (a > 0)
    step = g.sign() * pick / pick.sum(dim=1, keepdim=True).clamp(min=1)
    return step.view_as(grad)
