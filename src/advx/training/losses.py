"""Training recipes as plain loss functions: standard, FGSM-RS, PGD-AT, TRADES, distillation.

A recipe is built with its parameters and called by :func:`advx.training.fit` on each batch::

    fit(net, x, y, loss=fgsm_rs(0.3), epochs=10, lr=5e-3, lr_schedule="cyclic")

It receives a :class:`Batch` (the inputs, labels, the samples' global indices, the epoch, and two
ways to run the model) and returns a :class:`Step`: one loss per sample, plus the logits it saw
(for the accuracies shown while training). ``fit`` averages the losses over the global batch.

Adversarial examples are crafted with advx's threat-model geometry (``random_init``,
``steepest_ascent``, ``project``), so the ball, the bounds and every norm are handled in one
place. Random starts come from per-sample streams keyed by (seed, epoch, sample index): the
same sample gets the same start whatever batch or process it lands in.

Model mode while crafting, as in each paper's code:

* ``fgsm_rs`` and ``pgd_at`` craft in training mode (Wong et al. and Madry et al. keep the model
  in training mode throughout; with batch norm, batch statistics are used and the running
  averages are updated by the attack's passes too);
* ``trades`` crafts in eval mode (Zhang et al.'s code switches to eval for the inner
  maximization and back to training mode for the loss).

The crafting passes use the bare module, never the DistributedDataParallel wrapper, and only
ask for the gradient with respect to the input: they do not touch the weights' gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._rng import SampleRNG, derive_seed
from .._state import evaluating
from .._validate import nonneg_float, positive_float, positive_int
from ..errors import InputError
from ..threat import Linf, ThreatModel

__all__ = [
    "Recipe",
    "Batch",
    "Step",
    "standard",
    "fgsm_rs",
    "pgd_at",
    "trades",
    "distillation",
    "RECIPES",
    "recipe_name",
    "recipe_loss",
    "RecipeLoss",
]


@dataclass(frozen=True)
class Step:
    """What a recipe returns for a batch."""

    loss: Tensor  # (N,) one loss per sample; fit averages over the global batch
    logits: Tensor | None = None  # (N, C) on the clean inputs, when the recipe computed them
    adv_logits: Tensor | None = None  # (N, C) on the crafted inputs


@dataclass(eq=False)
class Batch:
    """One batch (this process's share of it) and the ways to run the model on it.

    ``model`` is the forward pass the training loss must use (through DistributedDataParallel
    under torchrun, under autocast when asked); ``craft`` runs the same weights without DDP's
    hooks, for the passes that only need input gradients. ``module`` is the bare ``nn.Module``
    (to switch its mode).
    """

    x: Tensor
    y: Tensor
    index: Tensor  # (N,) global sample ids: key the per-sample random streams
    epoch: int
    seed: int
    model: Callable[[Tensor], Tensor]
    craft: Callable[[Tensor], Tensor]
    module: nn.Module
    bounds: tuple[float, float] = (0.0, 1.0)
    grad_scale: float = 1.0  # multiplies crafting losses (fp16 autocast: keeps small gradients)

    def rng(self, *key: int) -> SampleRNG:
        """Per-sample random streams for this epoch."""
        return SampleRNG(derive_seed(self.seed, 0x7A11, self.epoch, *key), self.index)

    def threat(self, threat: ThreatModel) -> ThreatModel:
        return threat if threat.has_explicit_bounds else threat.with_bounds(self.bounds)

    def input_grad(
        self, x: Tensor, loss_of_logits: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """d sum(loss) / d x through the bare module; returns (gradient, logits), detached."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.craft(x)
            value = loss_of_logits(logits).sum() * self.grad_scale
            (grad,) = torch.autograd.grad(value, x)
        return grad, logits.detach()

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The bare module in eval mode for the duration; every submodule's mode restored after."""
        with evaluating(self.module):
            yield


@dataclass(frozen=True, eq=False)
class Recipe:
    """A named loss with its parameters. ``threat`` is the threat model it trains against (None
    for standard training and distillation); ``overfit_check`` asks ``fit`` to watch for
    catastrophic overfitting (Wong et al.) after every epoch."""

    name: str
    params: dict[str, Any]
    fn: Callable[[Batch], Step] = field(repr=False)
    threat: ThreatModel | None = None
    overfit_check: bool = False

    def __call__(self, batch: Batch) -> Step:
        return self.fn(batch)

    def check(self, bounds: tuple[float, float]) -> None:
        """Refuse an eps that does not fit the input range (known once the model is)."""
        if self.threat is None:
            return
        lo, hi = bounds
        eps = float(self.threat.eps)
        top = {"linf": hi - lo, "l2": math.inf, "l1": math.inf}[self.threat.norm]
        if not eps < top or eps <= 0:
            raise InputError(
                f"{self.name}: eps must be in (0, {top:g}) for inputs in [{lo:g}, {hi:g}], "
                f"got {eps:g}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dict(self.params),
            "threat": None if self.threat is None else self.threat.to_dict(),
        }


# ---- parameter checks ------------------------------------------------------------------------
def _threat(who: str, eps: float | ThreatModel) -> ThreatModel:
    threat = eps if isinstance(eps, ThreatModel) else None
    if threat is None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise InputError(
                f"{who}: eps must be a number (Linf) or a ThreatModel such as advx.L2(1.5), "
                f"got {eps!r}"
            )
        if not (math.isfinite(eps) and eps > 0):
            raise InputError(f"{who}: eps must be a finite number > 0, got {eps!r}")
        threat = Linf(float(eps))
    if threat.per_sample or threat.unbounded or threat.is_zero:
        raise InputError(f"{who}: needs one finite eps > 0, got {threat!r}")
    return threat


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


# ---- recipes ---------------------------------------------------------------------------------
def standard(temperature: float = 1.0) -> Recipe:
    """Cross-entropy on clean inputs, of the logits divided by ``temperature`` (a distillation
    teacher is trained at T > 1, Papernot et al. 2016; 1 is ordinary training)."""
    t = positive_float(temperature, name="temperature", who="standard")

    def run(b: Batch) -> Step:
        logits = b.model(b.x)
        return Step(_ce(logits / t, b.y), logits=logits)

    return Recipe("standard", {"temperature": t}, run)


def _warmup(who: str, warmup: Any) -> int:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"{who}: warmup must be an int >= 0 (epochs), got {warmup!r}")
    return warmup


def _warmed(b: Batch, threat: ThreatModel, warmup: int) -> tuple[ThreatModel, float]:
    """The batch's threat at the budget of its epoch, and that budget as a fraction of eps:
    (epoch + 1) / (warmup + 1) during the first ``warmup`` epochs (0-based), then 1."""
    th = b.threat(threat)
    scale = min(1.0, (b.epoch + 1) / (warmup + 1)) if warmup else 1.0
    return (th.with_eps(float(th.eps) * scale) if scale < 1.0 else th), scale


def fgsm_rs(
    eps: float | ThreatModel,
    alpha: float | None = None,
    *,
    clip_start: bool = False,
    warmup: int = 0,
) -> Recipe:
    """FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better than free").

    A point drawn uniformly from the ball, one steepest-ascent step of size ``alpha`` (default
    1.25 * eps) on the cross-entropy, projected back onto the ball and the bounds; the loss is the
    cross-entropy there. Crafted in training mode, as in the paper's code.

    As in the paper's code, the gradient is taken at the random start *before* it is clipped to
    the input bounds (only the final point is). This matters: on MNIST, where most pixels sit at
    0 or 1, clipping the start (``clip_start=True``) leaves half of them on the boundary, takes
    most of the randomness away, and training overfits catastrophically from the first epochs
    (PGD accuracy 0% while FGSM accuracy climbs past 90%, measured with Wong et al.'s settings).

    ``warmup``: as for :func:`pgd_at`, the first epochs train at a budget growing to eps (alpha
    in proportion).
    """
    threat = _threat("fgsm_rs", eps)
    a = (
        1.25 * float(threat.eps)
        if alpha is None
        else positive_float(alpha, name="alpha", who="fgsm_rs")
    )
    warm = _warmup("fgsm_rs", warmup)

    def run(b: Batch) -> Step:
        th, scale = _warmed(b, threat, warm)
        start = th.random_init(b.x, b.rng(0), clip=clip_start)
        grad, _ = b.input_grad(start, lambda z: _ce(z, b.y))
        x_adv = th.project(start + scale * a * th.steepest_ascent(grad), b.x).detach()
        logits = b.model(x_adv)
        return Step(_ce(logits, b.y), adv_logits=logits)

    params = {
        "eps": float(threat.eps),
        "alpha": a,
        **({"clip_start": True} if clip_start else {}),
        **({"warmup": warm} if warm else {}),
    }
    return Recipe("fgsm_rs", params, run, threat, overfit_check=True)


def pgd_at(
    eps: float | ThreatModel,
    steps: int = 10,
    step_size: float | None = None,
    *,
    random_start: bool = True,
    warmup: int = 0,
) -> Recipe:
    """PGD adversarial training (Madry et al. 2018): minimize the cross-entropy at the point
    that ``steps`` projected steepest-ascent steps of ``step_size`` (default 2.5 * eps / steps)
    from a uniform random start reach. Crafted in training mode, as in the paper's code.

    ``warmup``: the first ``warmup`` epochs train at a budget growing linearly to eps (epoch e
    at eps * (e + 1) / (warmup + 1)), the step size in proportion. A small net trained from
    scratch at the full budget can stay at chance: measured on MNIST at Linf 0.3 with the
    WongCNN, the loss stayed at 2.30 for 18 epochs at lr 5e-3, and for 2 epochs at 1e-3 and 3e-4.
    """
    threat = _threat("pgd_at", eps)
    n = positive_int(steps, name="steps", who="pgd_at")
    size = (
        2.5 * float(threat.eps) / n
        if step_size is None
        else positive_float(step_size, name="step_size", who="pgd_at")
    )
    warmup = _warmup("pgd_at", warmup)

    def run(b: Batch) -> Step:
        th, scale = _warmed(b, threat, warmup)
        x_adv = th.random_init(b.x, b.rng(0)) if random_start else b.x.clone()
        for _ in range(n):
            grad, _ = b.input_grad(x_adv, lambda z: _ce(z, b.y))
            x_adv = th.project(
                x_adv + scale * size * th.steepest_ascent(grad, x_adv=x_adv), b.x
            ).detach()
        logits = b.model(x_adv)
        return Step(_ce(logits, b.y), adv_logits=logits)

    params = {
        "eps": float(threat.eps),
        "steps": n,
        "step_size": size,
        "random_start": bool(random_start),
    }
    if warmup:
        params["warmup"] = warmup
    return Recipe("pgd_at", params, run, threat)


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q) per sample from log-probabilities, (N, C) -> (N,)."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=1)


def trades(
    eps: float | ThreatModel,
    beta: float = 6.0,
    steps: int = 10,
    step_size: float | None = None,
    *,
    start: float = 0.001,
) -> Recipe:
    """TRADES (Zhang et al. 2019): cross-entropy on the clean input plus ``beta`` times the KL
    divergence between the model's outputs on the clean input and on the point that maximizes
    that divergence in the ball (``steps`` steepest-ascent steps of ``step_size``, default
    2.5 * eps / steps, from the clean input plus Gaussian noise of scale ``start``, not clipped
    before the first step). The inner maximization runs in eval mode, as in the paper's code."""
    threat = _threat("trades", eps)
    b_ = nonneg_float(beta, name="beta", who="trades")
    n = positive_int(steps, name="steps", who="trades")
    size = (
        2.5 * float(threat.eps) / n
        if step_size is None
        else positive_float(step_size, name="step_size", who="trades")
    )
    s0 = nonneg_float(start, name="start", who="trades")

    def run(b: Batch) -> Step:
        th = b.threat(threat)
        with b.eval_mode():
            with torch.no_grad():
                p_clean = F.log_softmax(b.craft(b.x).float(), dim=1)
            noise = b.rng(0).normal(shape=tuple(b.x.shape[1:]), dtype=b.x.dtype).to(b.x.device)
            x_adv = b.x + s0 * noise  # unclipped, as in the paper's code: the steps project
            for _ in range(n):
                grad, _ = b.input_grad(
                    x_adv, lambda z: _kl(p_clean, F.log_softmax(z.float(), dim=1))
                )
                x_adv = th.project(
                    x_adv + size * th.steepest_ascent(grad, x_adv=x_adv), b.x
                ).detach()
        logits = b.model(b.x)
        adv = b.model(x_adv)
        robust = _kl(F.log_softmax(logits, dim=1), F.log_softmax(adv, dim=1))
        return Step(_ce(logits, b.y) + b_ * robust, logits=logits, adv_logits=adv)

    return Recipe(
        "trades",
        {"eps": float(threat.eps), "beta": b_, "steps": n, "step_size": size, "start": s0},
        run,
        threat,
    )


def distillation(teacher, temperature: float = 100.0) -> Recipe:
    """Defensive distillation (Papernot et al. 2016): the student learns the teacher's soft
    labels softmax(teacher(x) / T) with its own softmax at the same temperature T. At test time
    the student's logits are used as they are (temperature 1): its softmax saturates, which hides
    the gradients from attacks on the cross-entropy -- not a robust defense, a masked one.

    ``teacher``: an ``nn.Module`` or an :class:`advx.Classifier` (e.g. ``advx.zoo.load(dir)``),
    usually trained with ``standard(temperature=T)``.
    """
    from ..models import Classifier

    t = positive_float(temperature, name="temperature", who="distillation")
    if not isinstance(teacher, (nn.Module, Classifier)):
        raise InputError(
            "distillation: teacher must be an nn.Module or an advx.Classifier, "
            f"got {type(teacher).__name__}"
        )

    def soft_labels(x: Tensor) -> Tensor:
        if isinstance(teacher, Classifier):
            logits = teacher(x)
        else:
            with evaluating(teacher, no_grad=True):
                logits = teacher(x)
        return F.softmax(logits.float() / t, dim=1)

    def run(b: Batch) -> Step:
        soft = soft_labels(b.x)
        logits = b.model(b.x)
        loss = -(soft * F.log_softmax(logits / t, dim=1)).sum(dim=1)
        return Step(loss, logits=logits)

    name = type(teacher.net if isinstance(teacher, Classifier) else teacher).__name__
    return Recipe("distillation", {"temperature": t, "teacher": name}, run)


class _Names(dict):
    """The recipes by name; a name may be spelt as the command line does (``fgsm-rs``) or as
    the Python function is (``fgsm_rs``), in any case: :func:`recipe_name` reads both."""

    def __getitem__(self, name: Any) -> Callable[..., Recipe]:
        return super().__getitem__(recipe_name(name))

    def __contains__(self, name: object) -> bool:
        try:
            recipe_name(name)
        except InputError:
            return False
        return True

    def get(self, name: Any, default: Any = None) -> Any:
        return self[name] if name in self else default


# Names as the command line writes them, and the factories
RECIPES: dict[str, Callable[..., Recipe]] = _Names(
    {
        "standard": standard,
        "fgsm-rs": fgsm_rs,
        "pgd-at": pgd_at,
        "trades": trades,
        "distillation": distillation,
    }
)


def recipe_name(name: Any) -> str:
    """The one spelling of a recipe's name (the command line's: ``fgsm-rs``), from either
    spelling: ``fgsm_rs``, ``FGSM-RS`` and ``fgsm-rs`` are one recipe."""
    if not isinstance(name, str):
        raise InputError(f"recipe: expected a name such as 'fgsm_rs', got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in dict.keys(RECIPES):
        import difflib

        known = list(dict.keys(RECIPES))
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" -- did you mean {close[0]!r}?" if close else ""
        raise InputError(
            f"recipe: expected one of {', '.join(known)} (or with underscores: fgsm_rs, "
            f"pgd_at), got {name!r}{hint}"
        )
    return key


# ---- the recipes in the user's own loop --------------------------------------------------------
class RecipeLoss:
    """A recipe as a loss function for a training loop of one's own: ``loss(x, y)`` crafts the
    recipe's adversarial examples for the batch and returns the mean loss (a scalar to
    ``.backward()``), exactly as :func:`advx.training.fit` would compute it::

        loss_fn = advx.training.recipe_loss("trades", net, eps=8 / 255)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(x, y).backward()
            opt.step()

    ``model``: the ``nn.Module`` being trained (returning logits), or an :class:`advx.Classifier`
    around it (its bounds and normalization are used). Keep it in training mode, as any loop
    does: the recipes switch to eval mode where their paper does (TRADES' inner maximization)
    and back. The random starts come from per-sample streams keyed by (``seed``, ``epoch``,
    the number of samples seen so far): set ``loss_fn.epoch`` at each epoch for a ``warmup``.
    ``last`` holds the last batch's :class:`Step` (per-sample losses, the logits it saw).
    """

    def __init__(
        self,
        recipe: Recipe,
        model: Any,
        *,
        seed: int = 0,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        from ..models import Classifier

        if not isinstance(recipe, Recipe):
            raise InputError(
                "recipe_loss: recipe must be a name such as 'trades' or a Recipe such as "
                f"advx.training.trades(8 / 255), got {type(recipe).__name__}"
            )
        clf = model if isinstance(model, Classifier) else None
        net = clf.net if clf is not None else model
        if not isinstance(net, nn.Module):
            raise InputError(
                "recipe_loss: model must be an nn.Module or an advx.Classifier, "
                f"got {type(model).__name__}"
            )
        if bounds is None:
            bounds = clf.bounds if clf is not None else (0.0, 1.0)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        recipe.check(self.bounds)
        self.recipe, self.module, self.classifier = recipe, net, clf
        self.seed = int(seed)
        self.epoch = 0
        self.seen = 0  # samples so far: the ids that key the per-sample random streams
        self.last: Step | None = None

    def forward(self, x: Tensor) -> Tensor:
        """The model's logits on inputs in its bounds (through the Classifier's normalization)."""
        clf = self.classifier
        if clf is None:
            out = self.module(x)
            if not isinstance(out, Tensor):
                raise InputError(
                    f"recipe_loss: the model returned a {type(out).__name__}, not logits; wrap "
                    "it in an advx.Classifier with output= to say where the logits are"
                )
            return out
        return clf.logits_of(self.module(clf.preprocess(x)))

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InputError(
                "recipe_loss: call it with a batch of tensors, loss(x, y): x (N, ...) in the "
                f"model's bounds, y (N,) class indices; got {type(x).__name__}, "
                f"{type(y).__name__}"
            )
        n = x.shape[0]
        index = torch.arange(self.seen, self.seen + n, device=x.device)
        batch = Batch(
            x,
            y,
            index,
            self.epoch,
            self.seed,
            self.forward,
            self.forward,
            self.module,
            self.bounds,
        )
        step = self.recipe(batch)
        self.seen += n
        self.last = step
        return step.loss.mean()

    def __repr__(self) -> str:
        return f"RecipeLoss({self.recipe.name}, {self.recipe.params})"


def recipe_loss(
    recipe: str | Recipe,
    model: Any,
    *,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    **params: Any,
) -> RecipeLoss:
    """A recipe as a loss ``loss(x, y) -> scalar`` for one's own training loop (see
    :class:`RecipeLoss`). ``recipe``: a name (``"fgsm_rs"`` or ``"fgsm-rs"``, ``"pgd_at"``,
    ``"trades"``, ``"standard"``, ``"distillation"``) with its parameters as keywords
    (``eps=8 / 255, steps=7``), or a built Recipe such as ``advx.training.pgd_at(8 / 255)``."""
    if isinstance(recipe, str):
        recipe = RECIPES[recipe](**params)
    elif params:
        raise InputError(
            f"recipe_loss: parameters ({', '.join(sorted(params))}) go with a recipe's name; "
            "a built Recipe already has them"
        )
    return RecipeLoss(recipe, model, seed=seed, bounds=bounds)
