"""SimBA: simple black-box adversarial attacks (Guo, Gardner, You, Wilson & Weinberger, ICML 2019).

Pick a direction from an orthonormal basis (pixels, or the low frequencies of the 2-D DCT),
step along it by +step, and keep the step if the probability of the true class went down (of
the target went up); otherwise try -step. Each direction is used once per pass over the basis,
in a random order of the sample's own; the scores of the accepted point tell whether it is
adversarial, so a sample stops as soon as it is, at no extra cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._tensor import flat
from .._validate import nonneg_float, one_of, positive_int
from ..errors import InputError
from ._base import Attack, Problem, RunOutput
from ._best import Best
from ._registry import register

__all__ = ["SimBA", "dct_matrix", "dct2", "idct2"]


def dct_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The orthonormal DCT-II matrix (n, n): row k is the k-th cosine, so ``M @ v`` is the DCT
    of v and ``M.T @ c`` its inverse."""
    k = torch.arange(n, dtype=torch.float64, device=device).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64, device=device).view(1, -1)
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m.to(dtype)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II over the last two dimensions (each channel on its own)."""
    mh = dct_matrix(x.shape[-2], dtype=x.dtype, device=x.device)
    mw = dct_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return mh @ x @ mw.T


def idct2(c: Tensor) -> Tensor:
    """Inverse of :func:`dct2` (the basis is orthonormal: the transpose)."""
    mh = dct_matrix(c.shape[-2], dtype=c.dtype, device=c.device)
    mw = dct_matrix(c.shape[-1], dtype=c.dtype, device=c.device)
    return mh.T @ c @ mw


@register("simba")
@dataclass(kw_only=True, eq=False)
class SimBA(Attack):
    """SimBA with the pixel or the DCT basis, per-sample random order, per-sample budget.

    ``freq_dims``: the side of the block of directions used (the lowest frequencies for the DCT;
    default: a quarter of the image's side for the DCT, the whole image for pixels).
    ``order="random"`` draws the block's directions in a random order, a new one on each pass;
    ``"strided"`` (the paper's order for larger budgets) starts with the block and then adds
    bands of higher frequencies (rows and columns ``freq_dims .. freq_dims + stride``), each band
    in random order. Norms: L2 moves along unit-L2 directions by ``step`` and projects onto the
    ball; Linf moves one pixel (or one DCT basis image scaled to a peak of 1) by ``step`` and
    projects. Candidates the projection leaves where they were are not queried.
    """

    max_queries: int = 10_000
    basis: str = "dct"
    step: float = 0.2
    freq_dims: int | None = None
    order: str = "random"

    access = "scores"
    norms = ("l2", "linf")

    def _check(self) -> None:
        positive_int(self.max_queries, name="max_queries", who="SimBA")
        one_of(self.basis, ("pixel", "dct"), name="basis", who="SimBA")
        one_of(self.order, ("random", "strided"), name="order", who="SimBA")
        nonneg_float(self.step, name="step", who="SimBA")
        if self.step == 0:
            raise InputError("SimBA: step must be > 0")
        if self.freq_dims is not None:
            positive_int(self.freq_dims, name="freq_dims", who="SimBA")

    # ---- directions --------------------------------------------------------------------------
    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The directions in use, as flat indices into the (C, H, W) grid, and the band of each
        (0: the first block; k: the k-th stride of higher rows/columns)."""
        if x.dim() != 4:
            if self.basis == "dct":
                raise InputError(
                    "SimBA: the DCT basis needs images (N, C, H, W), got shape "
                    f"{tuple(x.shape)}; use basis='pixel'"
                )
            d = x[0].numel()
            return torch.arange(d, device=x.device), torch.zeros(
                d, dtype=torch.long, device=x.device
            )
        ch, hgt, wid = x.shape[1:]
        side = max(hgt, wid)
        f = self.freq_dims or (side if self.basis == "pixel" else max(1, math.ceil(side / 4)))
        f = min(f, side)
        u = torch.arange(hgt, device=x.device).view(1, -1, 1)
        v = torch.arange(wid, device=x.device).view(1, 1, -1)
        radius = torch.maximum(u, v).expand(ch, hgt, wid).reshape(-1)  # (C*H*W,)
        stride = max(1, f // 4)
        band = torch.where(radius < f, 0, 1 + torch.div(radius - f, stride, rounding_mode="floor"))
        keep = band == 0 if self.order == "random" else torch.ones_like(band, dtype=torch.bool)
        return keep.nonzero().view(-1), band[keep]

    def _directions(
        self, coords: Tensor, like: Tensor, linf: bool, mats: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """The basis vectors at flat grid indices ``coords`` (R,), shape (R, *like.shape[1:]).

        A DCT direction is the inverse DCT of one unit coefficient (c, u, v): in channel c, the
        outer product of the u-th and v-th cosines (rows of the DCT matrices), of unit L2 norm.
        """
        r = coords.numel()
        q = like.new_zeros(r, like[0].numel())
        if self.basis == "pixel":
            return q.scatter_(1, coords.view(-1, 1), 1.0).view(r, *like.shape[1:])
        assert mats is not None  # the DCT basis comes with its matrices
        mh, mw = mats
        hgt, wid = mh.shape[0], mw.shape[0]
        c, rest = torch.div(coords, hgt * wid, rounding_mode="floor"), coords % (hgt * wid)
        u, v = torch.div(rest, wid, rounding_mode="floor"), rest % wid
        rows_u, rows_v = mh[u], mw[v]  # (R, H), (R, W)
        if linf:  # a Linf step moves the basis image's peak by the step
            rows_u = rows_u / rows_u.abs().amax(dim=1, keepdim=True)
            rows_v = rows_v / rows_v.abs().amax(dim=1, keepdim=True)
        q = q.view(r, -1, hgt, wid)
        q[torch.arange(r, device=q.device), c] = rows_u.unsqueeze(2) * rows_v.unsqueeze(1)
        return q

    # ---- the attack --------------------------------------------------------------------------
    def _run(self, p: Problem) -> RunOutput:
        x0, n, labels = p.x, len(p), p.labels
        dev = x0.device
        linf = p.threat.norm == "linf"
        budget = self.max_queries - p.model.queries  # (N,) queries each sample may still spend
        if p.model.remaining is not None:
            budget = torch.minimum(budget, p.model.remaining)

        def query(rows: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
            """The score the attack lowers -- log p(true class), or -log p(target) -- and
            whether the point is adversarial, for the samples ``rows`` at ``xs``."""
            logits = p.model.select(rows).logits(xs)
            budget[rows] -= 1
            lp = F.log_softmax(logits, dim=1).gather(1, labels[rows].view(-1, 1)).view(-1)
            pred = logits.argmax(dim=1)
            if p.targeted:
                return -lp, pred == labels[rows]
            return lp, pred != labels[rows]

        # the walk's current point is its best: it moves only to a point of lower score. The
        # tracker's loss is minus that score (larger is better); -inf: not queried yet
        best = Best.highest(x0)
        start = (budget >= 1).nonzero().view(-1)
        if start.numel():
            score, adv = query(start, x0[start])  # adv: a randomized model may flip
            best.offer(start, x0[start], -score, adv)
        coords, band = self._grid(x0)
        mats: tuple[Tensor, Tensor] | None = None
        if self.basis == "dct":
            mats = (
                dct_matrix(x0.shape[2], dtype=x0.dtype, device=dev),
                dct_matrix(x0.shape[3], dtype=x0.dtype, device=dev),
            )
        m = coords.numel()
        order = coords.new_empty((n, m))  # drawn at t = 0
        # directions in a row that moved nothing
        idle = torch.zeros(n, dtype=torch.long, device=dev)
        active = torch.isfinite(best.score) & ~best.found & (budget >= 1)
        t = 0
        while bool(active.any()):
            if t % m == 0:  # a new pass: a fresh per-sample permutation of the directions
                u = p.rng.uniform(t // m, shape=(m,), dtype=torch.float64).to(dev)
                # (N, M): the bands in turn, a random order within each
                order = (band.to(u.dtype) + u).argsort(dim=1)
            moved = torch.zeros(n, dtype=torch.bool, device=dev)
            for sign in (1.0, -1.0):
                rows = (active & (budget >= 1)).nonzero().view(-1)
                if rows.numel() == 0:
                    break
                q = self._directions(coords[order[rows, t % m]], x0, linf, mats)
                cur = best.x[rows]
                cand = p.threat.select(rows).project(cur + sign * self.step * q, x0[rows])
                changed = flat(cand - cur).abs().amax(dim=1) > 0
                rows, cand = rows[changed], cand[changed]
                if rows.numel() == 0:
                    continue
                new, adv = query(rows, cand)
                # only a lower score moves the walk, even to an adversarial point
                better = -new > best.score[rows]
                best.offer(rows, cand, -new, adv & better)
                moved[rows] = True
                active[rows[better]] = False  # the other sign is tried only where this one failed
            # a sample that went a whole pass without a query (its ball is a point) is done
            idle = torch.where(moved, 0, idle + 1)
            active = ~best.found & (budget >= 1) & (idle < m)
            t += 1
        return best.output()
