"""The Attack base class: the shared work of every attack, done once.

An attack is a dataclass of hyper-parameters and a :class:`~advx.ThreatModel`; calling it on a
model and a batch runs the final :meth:`Attack.__call__`, which validates the inputs, puts the
model in eval mode and restores it, checks which samples are already misclassified (they cost
nothing more), calls the attack's small ``_run`` on the rest, projects onto the threat model,
scores success per sample and returns an :class:`AttackResult` with the per-sample counts of
forward and backward passes.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, final

import torch
from torch import Tensor, nn

from .._progress import progress
from .._rng import SampleRNG
from .._tensor import flat
from .._validate import check_classes, check_images, check_index, check_labels, check_target
from ..errors import AccessError, InputError, QueryError
from ..models._base import ACCESS_RANK, Access, Model, ModelView, Tracker
from ..models.classifier import as_model
from ..threat import NORMS, ThreatModel
from ._result import AttackResult, RunOutput

if TYPE_CHECKING:
    from ._repeat import Repeated

__all__ = ["Attack", "Problem", "RunOutput"]


@dataclass(eq=False)
class Problem:
    """The part of a batch an attack works on, and everything it needs about it.

    ``model`` charges every pass to these samples; ``rng`` draws from their own random streams;
    ``threat`` holds their budgets. ``select`` gives the same for a subset of the samples.
    """

    model: ModelView
    x: Tensor
    y: Tensor
    target: Tensor | None
    threat: ThreatModel
    rng: SampleRNG
    num_classes: int
    name: str = "attack"

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def targeted(self) -> bool:
        return self.target is not None

    @property
    def labels(self) -> Tensor:
        """The class the attack's loss is about: the target if targeted, else the true label."""
        return self.target if self.target is not None else self.y

    def is_adversarial(self, out: Tensor) -> Tensor:
        """bool (N,) from logits (N, C) or predicted labels (N,)."""
        pred = out.argmax(dim=1) if out.dim() == 2 else out
        return pred == self.target if self.target is not None else pred != self.y

    def select(self, idx: Tensor) -> Problem:
        return Problem(
            model=self.model.select(idx),
            x=self.x[idx],
            y=self.y[idx],
            target=None if self.target is None else self.target[idx],
            threat=self.threat.select(idx),
            rng=self.rng.select(idx),
            num_classes=self.num_classes,
            name=self.name,
        )

    def progress(self, n: int, desc: str | None = None) -> Iterator[int]:
        """``range(n)`` with a progress bar named after the attack."""
        return progress(range(n), total=n, desc=desc or self.name, unit="step")


@dataclass(eq=False)
class Attack(abc.ABC):
    """Base class of every attack. Subclasses are keyword-only dataclasses with a ``_run``.

    Class attributes describe the attack for the registry, the CLI and the shared tests:
    ``access`` (what it needs from the model), ``norms`` it supports, ``minimum_norm`` (it looks
    for the smallest perturbation and accepts an infinite eps) and ``supports_targeted``.
    """

    threat: ThreatModel
    seed: int = field(default=0, kw_only=True)

    name: ClassVar[str] = ""
    access: ClassVar[Access] = "gradients"
    norms: ClassVar[tuple[str, ...]] = NORMS
    minimum_norm: ClassVar[bool] = False
    supports_targeted: ClassVar[bool] = True

    def __post_init__(self) -> None:
        who = type(self).__name__
        if not isinstance(self.threat, ThreatModel):
            raise InputError(
                f"{who}: threat must be a ThreatModel such as advx.Linf(0.3), got {self.threat!r}"
            )
        if self.threat.norm not in self.norms:
            raise InputError(
                f"{who}: supports the norms {', '.join(self.norms)}, not {self.threat.norm}"
            )
        if self.threat.unbounded and not self.minimum_norm:
            raise InputError(
                f"{who}: eps is infinite but {who} is not a minimum-norm attack; give a finite eps"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"{who}: seed must be an int, got {self.seed!r}")
        self._check()

    def _check(self) -> None:
        """Validate the hyper-parameters at construction (cheap; override in subclasses)."""

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "threat" and f.init]

    @property
    def params(self) -> dict[str, Any]:
        """The hyper-parameters, as given (JSON-friendly where they are)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def with_seed(self, seed: int) -> Attack:
        """The same attack drawing its random numbers from ``seed``."""
        return dataclasses.replace(self, seed=seed)

    def repeat(self, times: int) -> Repeated:
        """This attack run ``times`` times, the best result kept per sample.

        Repetition r draws from its own per-sample streams (seed ``derive_seed(seed, r)``;
        repetition 0 is this attack as it is) and runs only on the samples no earlier one broke
        (a minimum-norm attack with an infinite eps: on every sample, keeping the closest
        success). The passes of every repetition are charged to their samples.
        """
        from ._repeat import Repeated

        return Repeated(self, times)

    # ---- the shared work ---------------------------------------------------------------------
    @final
    def __call__(
        self,
        model: Model | nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        target: Tensor | int | None = None,
        index: Tensor | None = None,
    ) -> AttackResult:
        """Attack a batch. ``target`` (one class per sample, or one for all) makes it targeted;
        ``index`` (global sample ids) keys the per-sample random streams."""
        start = time.perf_counter()
        model = as_model(model)
        if ACCESS_RANK[model.access] < ACCESS_RANK[self.access]:
            raise AccessError(
                f"{self.name or type(self).__name__} needs {self.access} but the model gives "
                f"only {model.access}; choose an attack from "
                f"advx.attacks.list_attacks(access='{model.access}')"
            )
        if target is not None and not self.supports_targeted:
            raise InputError(f"target: {type(self).__name__} is untargeted only")
        x = check_images(x, model.bounds)
        model.check_input(x)
        n = x.shape[0]
        y = check_labels(y, n, x.device)
        target = check_target(target, y)
        index = check_index(index, n, x.device)
        threat = self._bind(model.bounds, n)

        tracker = Tracker(n, x.device, budget=model.budget, label=self.name)
        view = ModelView(model, tracker)
        x_adv = x.clone()
        trace: dict[str, Any] = {}
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        with model.prepared(), _preserved_rng(x.device):
            try:
                if ACCESS_RANK[model.access] >= ACCESS_RANK["scores"]:
                    clean = view.logits(x)
                    num_classes = clean.shape[1]
                else:
                    clean = view.labels(x)
                    num_classes = int(getattr(model, "num_classes", None) or 0)
                if num_classes:
                    check_classes(y, num_classes)
                    if target is not None:
                        check_classes(target, num_classes, name="target")
                root = Problem(
                    view, x, y, target, threat, SampleRNG(self.seed, index), num_classes, self.name
                )
                success = root.is_adversarial(clean)
                todo = (~success).nonzero().view(-1)
                if todo.numel() and not threat.is_zero:
                    sub = root.select(todo)
                    out = self._run(sub)
                    if not isinstance(out, RunOutput):
                        raise TypeError(
                            f"{self.name or type(self).__name__}: _run must return a RunOutput, "
                            f"got {type(out).__name__}"
                        )
                    x_adv[todo], success[todo] = self._finish(sub, out.x_adv, out.success)
                    trace = _batch_trace(out.trace, todo, n)
            except QueryError as e:
                # keep what is known (the clean check's verdicts) and what was spent
                e.partial = self._result(x, x_adv, success, threat, tracker, target, start)
                e.queries = tracker.queries.clone()
                raise
        return self._result(x, x_adv, success, threat, tracker, target, start, trace)

    def _finish(self, p: Problem, x_adv: Tensor, ok: Tensor | None) -> tuple[Tensor, Tensor]:
        """Project onto the threat and the bounds; score the samples whose verdict is unknown
        or whose point the projection moved."""
        if x_adv.shape != p.x.shape:
            raise RuntimeError(
                f"{self.name}: _run returned shape {tuple(x_adv.shape)}, "
                f"expected {tuple(p.x.shape)}"
            )
        x_adv = x_adv.to(p.x.dtype)
        projected = p.threat.project(x_adv, p.x)
        lo, hi = p.threat.bounds
        moved = (
            flat(projected - x_adv).abs().amax(dim=1) > 1e-6 * (hi - lo)
            if projected.numel()
            else torch.zeros(len(p), dtype=torch.bool, device=p.x.device)
        )
        if ok is None:
            rescore = torch.ones(len(p), dtype=torch.bool, device=p.x.device)
            ok = torch.zeros(len(p), dtype=torch.bool, device=p.x.device)
        else:
            ok = ok.to(device=p.x.device, dtype=torch.bool).clone()
            rescore = moved
        idx = rescore.nonzero().view(-1)
        if idx.numel():
            view = p.model.select(idx)
            verdict = (
                view.logits(projected[idx])
                if p.model.access != "labels"
                else view.labels(projected[idx])
            )
            ok[idx] = p.select(idx).is_adversarial(verdict)
        return projected, ok

    def _bind(self, bounds: tuple[float, float], n: int) -> ThreatModel:
        threat = self.threat
        if threat.has_explicit_bounds and threat.bounds != tuple(bounds):
            raise InputError(
                f"threat: its bounds {threat.bounds} differ from the model's {tuple(bounds)}; "
                "declare the bounds once, on the Classifier"
            )
        eps = threat.eps
        if isinstance(eps, Tensor) and eps.numel() != n:
            raise InputError(f"threat: {eps.numel()} per-sample eps values for {n} samples")
        return threat.with_bounds(bounds)

    def _result(
        self,
        x: Tensor,
        x_adv: Tensor,
        success: Tensor,
        threat: ThreatModel,
        tracker: Tracker,
        target: Tensor | None,
        start: float,
        trace: dict[str, Any] | None = None,
    ) -> AttackResult:
        return AttackResult(
            x_adv=x_adv,
            success=success,
            distance=threat.distance(x_adv, x),
            queries=tracker.queries,
            grads=tracker.grads,
            name=self.name or type(self).__name__,
            params=self.params,
            threat=threat,
            target=target,
            seconds=time.perf_counter() - start,
            trace=trace or {},
        )

    @abc.abstractmethod
    def _run(self, p: Problem) -> RunOutput:
        """Attack the samples of ``p`` (none of them adversarial yet) and return a
        :class:`RunOutput`: the candidates (the base projects them), which are adversarial
        when the attack knows it, its loss at them when it has one, and a trace."""


def _batch_trace(extra: dict[str, Any], rows: Tensor, n: int) -> dict[str, Any]:
    """``_run``'s trace for the whole batch: each per-sample tensor gets its rows back in a
    tensor of n rows; the samples the clean check already found adversarial were not attacked
    and hold NaN (floats), -1 (integers) or False."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if isinstance(value, Tensor):
            fill = (
                math.nan
                if value.is_floating_point()
                else (False if value.dtype == torch.bool else -1)
            )
            full = torch.full((n, *value.shape[1:]), fill, dtype=value.dtype, device=value.device)
            full[rows.to(value.device)] = value
            value = full
        out[key] = value
    return out


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Leave the caller's global random state as it was (a randomized model may draw from it)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def step_size_default(threat: ThreatModel, x: Tensor, steps: int, factor: float = 2.5) -> Tensor:
    """Madry et al.'s rule of thumb: ``factor * eps / steps`` per sample, shape (N,)."""
    return threat.eps_tensor(x) * (factor / max(1, steps))
