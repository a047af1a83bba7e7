"""What an attack can query, and how every query is charged to the samples it was for.

:class:`Model` is the plug point: a white-box :class:`~advx.Classifier` gives gradients, a
black-box gives scores or only labels. Attacks never see a ``Model`` directly: they see a
:class:`ModelView`, which charges each forward and backward pass to the samples it was made for
(``queries`` and ``grads`` per sample), enforces the per-sample budget before a pass is spent,
and splits large batches into the chunk size the model runs fastest at.

An inner loop may keep the rows it is done with in its batch, frozen, instead of dropping them
(which reads a count back to the host): on a :meth:`ModelView.padded` view its passes name the
``frozen`` rows, which are not charged, and the charges are settled when rows are dropped and at
the end. Only a :attr:`Model.paddable` model is ever sent such rows: its passes are local
arithmetic, not queries someone answers and counts.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from .._io import tensor_bytes
from ..errors import AccessError, BudgetExceeded, InputError

__all__ = ["Access", "Model", "ModelView", "Tab", "Tracker", "ACCESS_RANK"]

Access = Literal["gradients", "scores", "labels"]
ACCESS_RANK = {"labels": 0, "scores": 1, "gradients": 2}

LossFn = Callable[..., Tensor]


class Model(abc.ABC):
    """Anything an attack can query. Subclasses implement the raw, uncounted passes."""

    access: Access = "gradients"
    bounds: tuple[float, float] = (0.0, 1.0)
    budget: int | None = None
    num_classes: int | None = None
    # Queries one pass over a row costs: a wrapper that queries the deployed model several
    # times per pass (EOT over n draws) sets it to n, so that budgets and counts see every draw.
    query_cost: int = 1

    # ``forward`` builds an autograd graph with respect to x (a Classifier, a defense over one):
    # a wrapper can then differentiate through it instead of asking for vector-Jacobian products
    autograd: bool = False

    # Rows an attack is done with may ride along in its passes, frozen and not charged (a GPU
    # then waits on no host sync to drop them): only for a model whose passes are local,
    # row-wise arithmetic, never one whose passes are real queries (a black box, an endpoint:
    # every row sent is a query someone counts) nor a wrapper that draws random numbers per
    # batch. Off unless a subclass knows better.
    paddable: bool = False

    # ---- the raw passes ------------------------------------------------------------------------
    # Not validated, not counted, not put in eval mode: attacks reach them through a ModelView,
    # which charges every pass to its samples; wrappers (defenses) and training call them
    # inside their own, already charged, passes. Users call the model instead (``model(x)``).
    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Scores (logits for a white-box model) for a batch in input space, shape (N, C)."""

    def scores(self, x: Tensor) -> Tensor:
        """``forward`` without a graph: what a score-based query returns."""
        with torch.no_grad():
            return self.forward(x)

    def labels(self, x: Tensor) -> Tensor:
        """Predicted classes, shape (N,): what a decision-based query returns."""
        return self.scores(x).argmax(dim=1)

    def value_and_grad(
        self, x: Tensor, loss_fn: LossFn, *args: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss (N,), d loss / d x, logits) for ``loss_fn(logits, *args)``, all detached."""
        if ACCESS_RANK[self.access] < ACCESS_RANK["gradients"] or not self.autograd:
            raise AccessError(
                f"{type(self).__name__} gives no gradients; use a score- or label-based attack"
            )
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(xg)
            loss = loss_fn(logits, *args)
            grad = None
            if loss.requires_grad:
                # inputs=[xg] only: the nets' parameter gradients (param.grad) are left alone;
                # ones as grad_outputs: the gradient of loss.sum(), without the sum's kernel
                (grad,) = torch.autograd.grad(
                    loss, xg, grad_outputs=_ones_like(loss), allow_unused=True
                )
        if grad is None:  # nothing differentiable between x and the loss (JPEG without BPDA)
            grad = torch.zeros_like(x)
        return loss.detach(), grad, logits.detach()

    # ---- what the model is made of -----------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        """The torch modules this model evaluates (none for a black box)."""
        return []

    def fingerprint(self) -> str:
        """sha256 of the weights and buffers of every module, in state-dict order, and of the
        input space (bounds, normalization): what a resumed audit or a guard policy must match."""
        h = hashlib.sha256()
        h.update(type(self).__name__.encode())
        nets = self.modules()
        if not nets:
            h.update(repr(self).encode())
        for net in nets:
            for name, t in net.state_dict().items():
                h.update(name.encode())
                h.update(tensor_bytes(t))
        for attr in ("_mean", "_std", "bounds"):
            h.update(repr(getattr(self, attr, None)).encode())
        return h.hexdigest()

    def prepared(self) -> contextlib.AbstractContextManager:
        """Put the model in the state attacks need for the duration of a call; restore it after."""
        return contextlib.nullcontext()

    def batch_size_for(self, x: Tensor, *, grad: bool) -> int:
        """How many rows to send per pass. The default sends everything at once."""
        return max(1, x.shape[0])

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error when x cannot go to this model (device, dtype). Cheap."""


class Tracker:
    """Per-sample counts of forward (``queries``) and backward (``grads``) passes."""

    def __init__(
        self, n: int, device: torch.device, *, budget: int | None = None, label: str = ""
    ) -> None:
        self.queries = torch.zeros(n, dtype=torch.long, device=device)
        self.grads = torch.zeros(n, dtype=torch.long, device=device)
        self.budget = budget
        self.label = label
        self._ones: dict[tuple[int, int], Tensor] = {}

    def charge(
        self, samples: Tensor, *, backward: bool, cost: int = 1, active: Tensor | None = None
    ) -> None:
        """Charge ``cost`` passes to each entry of ``samples`` (global row ids; repeats allowed);
        with ``active`` (bool, one per entry), to the active entries only."""
        # the last size's tensor of costs is kept: an inner loop's passes mostly repeat a size
        if active is not None:
            ones = active.to(samples.dtype) * cost
        else:
            kept = self._ones.get((samples.numel(), cost))
            if kept is None or kept.device != samples.device:
                kept = torch.full_like(samples, cost)
                self._ones = {(samples.numel(), cost): kept}
            ones = kept
        if self.budget is not None:
            after = self.queries.index_add(0, samples, ones)
            over = after > self.budget
            if bool(over.any()):
                raise BudgetExceeded(
                    f"{self.label or 'attack'}: the query budget of {self.budget} per sample "
                    f"would be exceeded for {int(over.sum())} sample(s); raise the model's "
                    f"budget= or give the attack fewer steps/queries",
                    queries=self.queries.clone(),
                )
        self.queries.index_add_(0, samples, ones)
        if backward:
            self.grads.index_add_(0, samples, ones)


class Tab:
    """The passes of a padded view, charged later: per pass, a count for the whole batch (a
    Python int) and a reference to its mask of frozen rows, no kernel; ``settle`` charges each
    row its passes less those it sat out frozen (two kernels per kind of pass). Only for views
    without a budget (a budget is checked before each pass, per row). The frozen masks are
    read when the tab is settled: a loop makes a new one when it changes, never writes into
    one."""

    __slots__ = ("view", "forward", "backward", "idle_forward", "idle_backward")

    def __init__(self, view: ModelView) -> None:
        self.view = view
        self.forward = 0  # forward-only passes over the batch since the last settle
        self.backward = 0  # forward+backward passes
        self.idle_forward: list[Tensor] = []  # the frozen rows of each forward-only pass
        self.idle_backward: list[Tensor] = []

    def count(self, *, backward: bool, frozen: Tensor | None) -> None:
        if backward:
            self.backward += 1
            if frozen is not None:
                self.idle_backward.append(frozen)
        else:
            self.forward += 1
            if frozen is not None:
                self.idle_forward.append(frozen)

    def settle(self) -> None:
        """Charge the passes counted so far to the view's samples, and start over."""
        if not (self.forward or self.backward):
            return
        index, cost = self.view.index, self.view.model.query_cost
        idle_b = _count(self.idle_backward)
        idle = _count(self.idle_forward + self.idle_backward)
        passes = torch.full_like(index, self.forward + self.backward)
        grads = torch.full_like(index, self.backward)
        self.view.add_counts(
            (passes if idle is None else passes - idle) * cost,
            (grads if idle_b is None else grads - idle_b) * cost,
        )
        self.forward = self.backward = 0
        self.idle_forward, self.idle_backward = [], []


def _count(masks: list[Tensor]) -> Tensor | None:
    """Per row, how many of ``masks`` (bool (R,) each) hold it; None for no mask."""
    if not masks:
        return None
    return torch.stack(masks).sum(dim=0)


class ModelView:
    """The model as an attack sees it: every pass is charged to the samples it is for.

    A view covers some samples of the attacked batch (``index``: their rows in the tracker).
    Methods take a batch ``x`` with one row per sample of the view; an attack that sends several
    candidates per sample passes ``rows=`` (for each row of ``x``, its sample's position in the
    view) instead.
    """

    __slots__ = ("model", "tracker", "index", "tab")

    def __init__(
        self, model: Model, tracker: Tracker, index: Tensor | None = None, *, padded: bool = False
    ) -> None:
        self.model = model
        self.tracker = tracker
        if index is None:
            index = torch.arange(tracker.queries.numel(), device=tracker.queries.device)
        self.index = index
        if padded and (not model.paddable or tracker.budget is not None):
            raise InputError(
                f"internal: {type(model).__name__} cannot take frozen rows (not paddable, or "
                "under a budget); compact the batch every iteration instead"
            )
        # a padded view's passes go on a tab, settled when rows are dropped and at the end
        self.tab = Tab(self) if padded else None

    def __len__(self) -> int:
        return self.index.numel()

    def select(self, idx: Tensor) -> ModelView:
        """The samples ``idx`` of this view (a padded view settles its tab first)."""
        self.settle()
        return ModelView(self.model, self.tracker, self.index[idx], padded=self.tab is not None)

    def padded(self) -> ModelView:
        """This view, for a loop that keeps the rows it is done with in the batch, frozen: each
        pass names them (``frozen=``) and charges only the others, on a tab that ``select`` and
        ``settle`` charge to the tracker. Only for a :attr:`Model.paddable` model, no budget."""
        return ModelView(self.model, self.tracker, self.index, padded=True)

    def settle(self) -> None:
        """Charge the passes of a padded view's tab (nothing to do on another view)."""
        if self.tab is not None:
            self.tab.settle()

    @property
    def access(self) -> Access:
        return self.model.access

    @property
    def queries(self) -> Tensor:
        """Forward passes spent so far by each sample of this view, shape (len(view),)."""
        self.settle()
        return self.tracker.queries[self.index]

    @property
    def remaining(self) -> Tensor | None:
        """Queries each sample may still spend under the model's budget (None: no budget)."""
        if self.tracker.budget is None:
            return None
        return self.tracker.budget - self.queries

    def _samples(self, x: Tensor, rows: Tensor | None) -> Tensor:
        if rows is None:
            if x.shape[0] != len(self):
                raise InputError(
                    f"internal: a pass over {x.shape[0]} rows on a view of {len(self)} samples; "
                    "pass rows= to say which sample each row belongs to"
                )
            return self.index
        return self.index[rows]

    def _charge(
        self, x: Tensor, rows: Tensor | None, frozen: Tensor | None, *, backward: bool
    ) -> None:
        """Charge one pass over ``x``: to every row's sample, or to those not ``frozen``."""
        if self.tab is not None and rows is None and x.shape[0] == len(self):
            self.tab.count(backward=backward, frozen=frozen)
            return
        if self.tab is not None:
            raise InputError("internal: a padded view's passes send one row per sample")
        samples = self._samples(x, rows)
        active = None if frozen is None else ~frozen
        self.tracker.charge(samples, backward=backward, cost=self.model.query_cost, active=active)

    def _chunks(self, x: Tensor, grad: bool) -> Iterator[slice]:
        size = self.model.batch_size_for(x, grad=grad)
        for start in range(0, x.shape[0], size):
            yield slice(start, start + size)

    def logits(
        self, x: Tensor, *, rows: Tensor | None = None, frozen: Tensor | None = None
    ) -> Tensor:
        """Scores for each row (logits for a white-box model), shape (R, C). Needs score access.
        ``frozen`` (bool (R,)): rows riding along that are not charged."""
        if ACCESS_RANK[self.model.access] < ACCESS_RANK["scores"]:
            raise AccessError("this model gives labels only; the attack asked for scores")
        self._charge(x, rows, frozen, backward=False)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.model.num_classes or 0)
        with torch.no_grad():
            if self.model.batch_size_for(x, grad=False) >= x.shape[0]:
                return self.model.scores(x)  # one chunk: no slicing, no copy into a cat
            return torch.cat([self.model.scores(x[s]) for s in self._chunks(x, False)])

    def labels(
        self, x: Tensor, *, rows: Tensor | None = None, frozen: Tensor | None = None
    ) -> Tensor:
        """Predicted class of each row, shape (R,). Works with every kind of access."""
        self._charge(x, rows, frozen, backward=False)
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        with torch.no_grad():
            return torch.cat([self.model.labels(x[s]) for s in self._chunks(x, False)])

    def value_and_grad(
        self,
        x: Tensor,
        loss_fn: LossFn,
        *args: Tensor,
        rows: Tensor | None = None,
        frozen: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One forward and one backward pass per row.

        ``loss_fn(logits, *args)`` returns one loss per row; ``args`` are per-row tensors (e.g.
        labels), split into chunks together with ``x``. Returns (loss (R,), d loss / d x, logits),
        all detached. ``frozen`` (bool (R,)): rows riding along that are not charged.
        """
        if ACCESS_RANK[self.model.access] < ACCESS_RANK["gradients"]:
            raise AccessError("this model gives no gradients; the attack asked for them")
        self._charge(x, rows, frozen, backward=True)
        if x.shape[0] == 0:
            return x.new_zeros(0), torch.zeros_like(x), x.new_zeros(0, self.model.num_classes or 0)
        if self.model.batch_size_for(x, grad=True) >= x.shape[0]:
            return self.model.value_and_grad(x, loss_fn, *args)  # one chunk
        losses, grads, logits = [], [], []
        for s in self._chunks(x, True):
            value, grad, out = self.model.value_and_grad(x[s], loss_fn, *(a[s] for a in args))
            losses.append(value)
            grads.append(grad)
            logits.append(out)
        return torch.cat(losses), torch.cat(grads), torch.cat(logits)

    def add_counts(self, queries: Tensor, grads: Tensor) -> None:
        """Charge passes that a nested attack spent on this view's samples (for cascades)."""
        self.tracker.queries.index_add_(0, self.index, queries.to(self.tracker.queries))
        self.tracker.grads.index_add_(0, self.index, grads.to(self.tracker.grads))


def _ones_like(t: Tensor) -> Tensor:
    """``torch.ones_like(t)``, kept for the last shape asked: the gradient's grad_outputs, made
    once per inner loop instead of once per pass (autograd only reads it). Read once into a
    local: another thread may replace the kept tensor meanwhile."""
    global _ONES
    ones = _ONES
    if ones is None or ones.shape != t.shape or ones.dtype != t.dtype or ones.device != t.device:
        ones = _ONES = torch.ones_like(t)
    return ones


_ONES: Tensor | None = None
