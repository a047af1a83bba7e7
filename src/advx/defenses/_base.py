"""What every defense shares: a :class:`~advx.models.Model` that wraps other models.

A defense is itself a ``Model``: attacks, the audit and the guard query it like any classifier,
and every query is charged to the attacked samples by the same tracker. Internally a defense
builds its output as one autograd graph (``forward``) over the models it wraps, with
straight-through estimators (BPDA) where a part is not differentiable; gradients then come from
that graph, whatever the nesting (``EOT(BitDepth(Ensemble([...]), 4))``).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .._validate import check_images
from ..errors import AccessError, InputError
from ..models._base import ACCESS_RANK, Access, Model, ModelView, Tracker
from ..models.classifier import as_model

__all__ = ["Defense", "graph", "straight_through"]


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` forward, identity backward: BPDA's estimator for ``fn(x) ~ x`` (Athalye et al.,
    2018), which holds for transforms that keep the image close to the input."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        out = fn(x)
        return out.clone() if out is x else out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def straight_through(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)``, with the gradient of the identity on the backward pass (BPDA)."""
    return _StraightThrough.apply(x, fn)


class _ModelVJP(torch.autograd.Function):
    """The logits of a gradient-giving Model whose forward builds no autograd graph, as a
    node of an autograd graph: its backward asks the model for the vector-Jacobian product
    through ``value_and_grad`` with the loss ``<logits, upstream gradient>``."""

    @staticmethod
    def forward(ctx, x: Tensor, model: Model) -> Tensor:
        ctx.model = model
        ctx.save_for_backward(x)
        return model.scores(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        _, gx, _ = ctx.model.value_and_grad(x, lambda z, u: (z * u).sum(dim=1), grad)
        return gx, None


def graph(model: Model, x: Tensor) -> Tensor:
    """The logits of ``model`` at ``x`` (N, C), differentiable with respect to ``x`` when
    autograd is on and the model gives gradients. Not charged to any tracker: the caller is a
    wrapper whose own query was charged."""
    if not torch.is_grad_enabled() or ACCESS_RANK[model.access] < ACCESS_RANK["gradients"]:
        return model.scores(x)
    if model.autograd:
        return model.forward(x)
    return _ModelVJP.apply(x, model)


def _min_access(models: Iterable[Model]) -> Access:
    return min((m.access for m in models), key=ACCESS_RANK.__getitem__)


class Defense(Model):
    """Base class of the defenses: wraps ``model`` and keeps its bounds, budget and state.

    Subclasses implement ``forward(x)``: the defended logits as an autograd graph (use
    :func:`graph` to call a wrapped model). Scores and gradients follow from it; a subclass may
    override ``scores`` or ``value_and_grad`` when it can do better (EOT does).
    """

    autograd = True

    def __init__(self, model, *, name: str | None = None) -> None:
        self.model = as_model(model)
        self.bounds = self.model.bounds
        self.budget = self.model.budget
        self.name = name or type(self).__name__

    # ---- what the wrapped models say ---------------------------------------------------------
    def _wrapped(self) -> list[Model]:
        """Every model this defense queries (for state, devices and chunk sizes)."""
        return [self.model]

    @property
    def access(self) -> Access:  # type: ignore[override]
        return _min_access(self._wrapped())

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        return self.model.num_classes

    @property
    def query_cost(self) -> int:  # type: ignore[override]
        return max(m.query_cost for m in self._wrapped())

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Each wrapped model in the state attacks need (eval mode...), restored after."""
        with contextlib.ExitStack() as stack:
            for m in self._wrapped():
                stack.enter_context(m.prepared())
            yield

    def check_input(self, x: Tensor) -> None:
        for m in self._wrapped():
            m.check_input(x)

    def batch_size_for(self, x: Tensor, *, grad: bool) -> int:
        return min(m.batch_size_for(x, grad=grad) for m in self._wrapped())

    def __repr__(self) -> str:
        return f"{self.name}({self.model!r})"

    # ---- public, for users (like Classifier) -------------------------------------------------
    def _view(self, x: Tensor) -> ModelView:
        return ModelView(self, Tracker(x.shape[0], x.device))

    def _checked(self, x: Tensor) -> Tensor:
        x = check_images(x, self.bounds, name="x")
        self.check_input(x)
        return x

    def __call__(self, x: Tensor) -> Tensor:
        """Defended scores for a batch in input space (validated, eval mode, no grad)."""
        x = self._checked(x)
        if ACCESS_RANK[self.access] < ACCESS_RANK["scores"]:
            raise AccessError(f"{self.name} gives labels only; use .predict(x)")
        with self.prepared(), torch.no_grad():
            return self._view(x).logits(x)

    def predict(self, x: Tensor) -> Tensor:
        """Predicted labels, shape (N,)."""
        x = self._checked(x)
        with self.prepared(), torch.no_grad():
            return self._view(x).labels(x)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y.to(x.device)).float().mean())

    # ---- Model interface ---------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        found: list[nn.Module] = []
        for m in self._wrapped():
            found += [net for net in m.modules() if all(net is not f for f in found)]
        return found

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """The defended logits (N, C), differentiable with respect to x when autograd is on."""


def chunked(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    """``fn`` over ``x`` in chunks of ``size`` rows, results concatenated along dim 0."""
    if x.shape[0] == 0:
        return fn(x)
    return torch.cat([fn(x[s : s + size]) for s in range(0, x.shape[0], size)])


def check_same_bounds(models: list[Model], who: str) -> tuple[float, float]:
    bounds = {(float(m.bounds[0]), float(m.bounds[1])) for m in models}
    if len(bounds) > 1:
        raise InputError(
            f"{who}: the models have different input bounds {sorted(bounds)}; "
            "declare the same bounds on every Classifier"
        )
    return bounds.pop()


def check_scores(model: Model, who: str) -> None:
    if ACCESS_RANK[model.access] < ACCESS_RANK["scores"]:
        raise InputError(f"{who}: needs a model that gives scores, got a label-only {model!r}")
