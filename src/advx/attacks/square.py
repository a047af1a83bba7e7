"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

Each iteration proposes one candidate per sample that differs from the sample's current best
point in a random square window only, queries the model once, and keeps the candidate when it
lowers the paper's loss (here: raises the loss of ``_losses``, where larger is better for the
attacker). The window side shrinks with the iteration number by the paper's piecewise-constant
schedule of ``p``, the fraction of the pixels changed.

Query accounting, per sample (forward passes, every one charged through ``p.model``):
1 clean check (the base class) + 1 evaluation of the initial point + at most ``queries``
candidate evaluations, so at most ``queries + 2`` in all. With ``restarts = R`` the
``queries + 1`` passes of the search (initial points included) are split evenly between the
restarts, so the total stays ``queries + 2``. A sample stops being queried as soon as it is
adversarial, and as soon as the model's own budget (``p.model.remaining``) is spent.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .._tensor import flat, per_sample
from .._validate import one_of, positive_int
from ..errors import InputError
from ._base import Attack, Problem, RunOutput
from ._best import Best
from ._lanes import Lanes, masked
from ._losses import get_loss
from ._registry import register

# Attempts per iteration at a Linf square whose signs change at least one pixel (see _linf_step).
_SIGN_TRIES = 8
_TINY = 1e-12
# (upper end of the rescaled iteration range, divisor of p_init): the authors' schedule for
# 10,000 iterations; a run of n iterations reads it at t * 10000 / n.
_SCHEDULE = (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
)


def p_schedule(p_init: float, t: int, iterations: int) -> float:
    """Fraction of the pixels the square covers at iteration ``t`` (0-based) of ``iterations``."""
    it = int(t / iterations * 10000)
    for end, div in _SCHEDULE:
        if it <= end:
            return p_init / div
    return p_init / 512


@functools.lru_cache(maxsize=64)
def _eta(s: int) -> Tensor:
    """The paper's L2 square pattern (eq. 6), float64 (s, s), unit L2 norm.

    Two rectangles, the top s//2 rows and the bottom s - s//2 rows, each filled with nested
    centred frames: a cell at Chebyshev distance d from its rectangle's centre gets
    sum_{j=d+1}^{n+1} 1/j^2 (n: half the rectangle's longer side), so the mass peaks in the
    middle; the bottom rectangle has the opposite sign.
    """

    def rectangle(a: int, b: int) -> Tensor:
        d = torch.maximum(
            (torch.arange(a) - a // 2).abs().view(-1, 1),
            (torch.arange(b) - b // 2).abs().view(1, -1),
        ).to(torch.float64)  # (a, b)
        n = max(a // 2, b // 2)
        inv_sq = 1.0 / torch.arange(1, n + 2, dtype=torch.float64) ** 2
        tail = inv_sq.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{j=d+1}^{n+1} 1/j^2
        r = tail[d.long()]
        return r / r.norm().clamp_min(_TINY)

    eta = torch.cat([rectangle(s // 2, s), -rectangle(s - s // 2, s)], dim=0)
    return eta / eta.norm()


def _windows(u_row: Tensor, u_col: Tensor, s: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-left corners uniform in {0..h-s} x {0..w-s} from uniforms (N,); returns the row and
    column index grids (N, s) and the window mask (N, 1, H, W)."""
    top = torch.clamp((u_row * (h - s + 1)).floor().long(), max=h - s)
    left = torch.clamp((u_col * (w - s + 1)).floor().long(), max=w - s)
    ar = torch.arange(s, device=top.device)
    rows, cols = top.view(-1, 1) + ar, left.view(-1, 1) + ar  # (N, s)
    hh, ww = torch.arange(h, device=top.device), torch.arange(w, device=top.device)
    in_rows = (hh >= top.view(-1, 1)) & (hh < top.view(-1, 1) + s)  # (N, H)
    in_cols = (ww >= left.view(-1, 1)) & (ww < left.view(-1, 1) + s)  # (N, W)
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return rows, cols, mask


@register("square")
@dataclass(kw_only=True, eq=False)
class Square(Attack):
    """Square Attack: random search over square-shaped updates, scores only, no gradients.

    Linf: vertical stripes of +-eps (one sign per channel and column) to start, then each
    iteration sets a random square window to x +- eps, with one random sign per channel.
    L2: a 5x5 grid of the paper's two-hump pattern with random signs, rescaled to norm eps, then
    the update of the paper's Algorithm 3: a new pattern in window W1, the mass of a second window
    W2 moved into it, and any unused budget spent, so that every candidate has norm eps before
    clipping to the bounds.

    ``queries``: candidate evaluations per sample (the module docstring has the exact
    accounting). ``p_init``: the fraction of the pixels of the first squares; it decays with the
    authors' schedule rescaled to ``queries``. ``loss``: ``"margin"`` (logit margin, towards the
    target when ``target=`` is given) or ``"ce"``. A candidate replaces the current point only
    when it lowers the loss, or when it is adversarial (the sample then stops). Needs inputs of
    shape (N, C, H, W).
    """

    queries: int = 5000
    p_init: float = 0.8
    loss: str = "margin"
    restarts: int = 1

    access = "scores"
    norms = ("linf", "l2")

    def _check(self) -> None:
        positive_int(self.queries, name="queries", who="Square")
        positive_int(self.restarts, name="restarts", who="Square")
        one_of(self.loss, ("margin", "ce"), name="loss", who="Square")
        ok = isinstance(self.p_init, (int, float)) and not isinstance(self.p_init, bool)
        if not ok or not 0 < self.p_init <= 1:
            raise InputError(f"Square: p_init must be a number in (0, 1], got {self.p_init!r}")
        if self.queries + 1 < 2 * self.restarts:
            raise InputError(
                f"Square: {self.restarts} restarts need queries >= {2 * self.restarts - 1} "
                "(each restart spends one pass on its starting point and at least one on a "
                f"candidate), got {self.queries}"
            )

    def _run(self, p: Problem) -> RunOutput:
        if p.x.dim() != 4:
            raise InputError(
                f"Square: expected images of shape (N, C, H, W), got shape {tuple(p.x.shape)}"
            )
        # across restarts, per sample: the adversarial point, else the one with the highest
        # attacker's loss (the paper's lowest)
        best = Best.highest(p.x)
        # samples that cannot move (eps 0) or whose model budget ran out are done
        done = p.threat.eps_tensor(p.x) <= 0
        total = self.queries + 1  # passes of the search: initial points and candidates
        shares = [
            total // self.restarts + (r < total % self.restarts) for r in range(self.restarts)
        ]
        best.rounds(
            self.restarts,
            lambda rows, r: self._search(p, rows, r, shares[r], best, done),
            skip=done,
        )
        return best.output()

    # ---- one restart ---------------------------------------------------------------------------
    def _search(
        self, p: Problem, rows: Tensor, restart: int, share: int, best: Best, done: Tensor
    ) -> None:
        """Run one restart on ``rows``, with ``share`` passes per sample; update the shared
        per-sample state (``best``, ``done``) in place."""
        loss_fn = partial(get_loss(self.loss), targeted=p.targeted)
        linf = p.threat.norm == "linf"

        def affordable(q: Problem) -> Tensor:
            left = q.model.remaining
            return (
                torch.ones(len(q), dtype=torch.bool, device=q.x.device)
                if left is None
                else left >= 1
            )

        q = p.select(rows)
        budget = q.model.remaining is not None
        if budget:
            ok = affordable(q)
            done[rows[~ok]] = True
            keep_idx = ok.nonzero().view(-1)
            rows, q = rows[keep_idx], q.select(keep_idx)
        if rows.numel() == 0:
            return
        # Without a budget, adversarial samples leave at the next compaction and ride along
        # frozen until then (``lanes.done``: their candidates are not taken, their passes not
        # charged). A budget is checked before every pass: its loop compacts every iteration.
        lanes = Lanes(q, every=1 if budget else None)
        q = lanes.start(q)
        eps = q.threat.eps_tensor(q.x)
        x_cur = self._linf_init(q, restart, eps) if linf else self._l2_init(q, restart, eps)
        logits = q.model.logits(x_cur)
        cur_loss, adv = loss_fn(logits, q.labels), q.is_adversarial(logits)
        found = lanes.mark(adv)

        iterations = share - 1
        n, c, h, w = q.x.shape
        # the random numbers of a block of iterations are drawn at once (bit for bit those of
        # one draw per iteration), and what does not change between iterations is made once
        width = 2 + _SIGN_TRIES * c if linf else 4 + c + 1
        block = max(1, min(64, (1 << 22) // max(1, n * width)))
        draws = torch.empty(0)
        tables: list[tuple[Tensor, ...]] = []
        if linf:
            e = per_sample(eps, q.x)
            # the window's two values (x +- eps, clipped), stacked: (2, N, C, H, W)
            values = torch.stack([q.threat.clip(q.x + e), q.threat.clip(q.x - e)])
            plus, minus = values.unbind(0)
        desc = f"{p.name} restart {restart + 1}/{self.restarts}" if self.restarts > 1 else None
        # Across restarts ``best`` keeps the point to return. Within one, x_cur is already the
        # best candidate so far (a candidate replaces it exactly when ``best`` would take it:
        # an adversarial one, or a strictly higher loss), so x_cur is offered only when its
        # sample leaves the search and at the end, not after every query.
        for t in p.progress(iterations, desc):
            # per-sample early stop: adversarial samples and those out of model budget leave
            idx = None
            if budget:
                go = ~found & affordable(q)
                if not bool(go.all()):  # an adversarial sample is not in go either
                    best.offer(rows, x_cur, cur_loss, found)
                    done[rows[~found & ~go]] = True
                    idx = go.nonzero().view(-1)
                lanes.done = None
            elif lanes.due(t - 1):  # compacts before iteration t, after the pass of t - 1
                idx = lanes.compact()
                if idx is not None:
                    best.offer(rows, x_cur, cur_loss, found)
            if idx is not None:
                rows, q, x_cur, cur_loss, eps = (
                    rows[idx],
                    q.select(idx),
                    x_cur[idx],
                    cur_loss[idx],
                    eps[idx],
                )
                if draws.dim() > 1:
                    draws = draws[idx]
                    if linf:  # the block's tables hold row positions: remade for the rows left
                        tables = self._linf_tables(draws, t - t % block, iterations, h, w)
                if linf:
                    values = values[:, idx]
                    plus, minus = values.unbind(0)
                if rows.numel() == 0:
                    q.model.settle()
                    return
            if t % block == 0:
                # (N, block, width): the uniforms of iterations t .. t + block - 1
                draws = q.rng.uniform_block(
                    1,
                    restart,
                    last=range(t, min(t + block, iterations)),
                    shape=(width,),
                    dtype=torch.float64,
                ).to(q.x.device)
                if linf:
                    tables = self._linf_tables(draws, t, iterations, h, w)
            if linf:
                cand = self._linf_step(x_cur, values, plus, minus, *tables[t % block])
            else:
                u = draws[:, t % block]
                cand = self._l2_step(q, x_cur, eps, p_schedule(self.p_init, t, iterations), u)
            logits = q.model.logits(cand, frozen=lanes.done)
            loss, adv = loss_fn(logits, q.labels), q.is_adversarial(logits)
            # the paper accepts a strict decrease of its loss; an adversarial candidate is kept
            # too (with the CE loss it may not be a decrease), since its sample stops here; a
            # frozen sample takes nothing
            better = masked(adv | (loss > cur_loss), lanes.done)
            x_cur = torch.where(better.view(-1, 1, 1, 1), cand, x_cur)
            cur_loss = torch.where(better, loss, cur_loss)
            found = lanes.mark(adv)
        q.model.settle()
        best.offer(rows, x_cur, cur_loss, found)

    # ---- Linf --------------------------------------------------------------------------------
    def _linf_init(self, q: Problem, restart: int, eps: Tensor) -> Tensor:
        """Vertical stripes: x + eps * sign, one sign per channel and column."""
        _, c, _, w = q.x.shape
        u = q.rng.uniform(0, restart, shape=(c, 1, w), dtype=q.x.dtype).to(
            q.x.device
        )  # (N, C, 1, W)
        sign = torch.where(u < 0.5, -1.0, 1.0).to(q.x.dtype)
        return q.threat.clip(q.x + per_sample(eps, q.x) * sign)

    def _linf_tables(
        self, draws: Tensor, t0: int, iterations: int, h: int, w: int
    ) -> list[tuple[Tensor, ...]]:
        """What the Linf steps t0 .. t0 + B - 1 need from their uniforms ``draws`` (N, B, width),
        made for the whole block at once; one tuple per step, of ``_linf_step``'s arguments.

        The window of step t: a side s_t from the schedule and a top-left corner uniform in
        {0..h-s_t} x {0..w-s_t} (u * (h - s_t + 1), truncated, at most h - s_t), kept as its
        rows (N, 1, H, 1) and columns (N, 1, 1, W). The signs of the tries (N, tries, C), True:
        +eps. ``slots`` (N, tries, C): where each try's sign of each channel is found in the
        flat (2, N, C) table of ``_linf_step`` (which signs change a pixel of the window)."""
        n, b, _ = draws.shape
        c = (draws.shape[2] - 2) // _SIGN_TRIES
        dev = draws.device
        sides = [
            self._linf_side(p_schedule(self.p_init, t, iterations), h, w) for t in range(t0, t0 + b)
        ]
        s = torch.tensor(sides, dtype=torch.long, device=dev)  # (B,)

        def spans(u: Tensor, size: int) -> Tensor:
            # u >= 0: truncation is floor; the product is the one of u * (size - s + 1)
            first = torch.minimum((u * (size - s + 1)).long(), size - s)  # (N, B)
            pos = torch.arange(size, device=dev)
            return (pos >= first.unsqueeze(2)) & (pos < (first + s).unsqueeze(2))  # (N, B, size)

        in_rows = spans(draws[:, :, 0], h).view(n, b, 1, h, 1)
        in_cols = spans(draws[:, :, 1], w).view(n, b, 1, 1, w)
        signs = (draws[:, :, 2:] < 0.5).view(n, b, _SIGN_TRIES, c)
        slots = (
            (~signs).long() * (n * c)
            + torch.arange(n, device=dev).view(n, 1, 1, 1) * c
            + torch.arange(c, device=dev)
        )
        return list(zip(in_rows.unbind(1), in_cols.unbind(1), signs.unbind(1), slots.unbind(1)))

    @staticmethod
    def _linf_side(p_t: float, h: int, w: int) -> int:
        """The side of the Linf square covering p_t of the H*W pixel positions."""
        s = int(round(math.sqrt(p_t * h * w)))
        return max(1, min(s, min(h, w) - 1))

    @staticmethod
    def _linf_step(
        x_cur: Tensor,
        values: Tensor,
        plus: Tensor,
        minus: Tensor,
        in_rows: Tensor,
        in_cols: Tensor,
        signs: Tensor,
        slots: Tensor,
    ) -> Tensor:
        """x_cur with one random s x s window set to x +- eps (one sign per channel): the first
        of the tries whose signs change a pixel of the window. ``values`` (2, N, C, H, W): x +
        eps and x - eps clipped to the bounds (``plus`` and ``minus``: its two parts); the others:
        one step's ``_linf_tables``."""
        n, c = x_cur.shape[:2]
        mask = in_rows & in_cols  # (N, 1, H, W)
        # a sign that leaves the window as it is wastes a query: per channel, which signs change
        # a pixel of the window, (2, N, C); then which tries change one, (N, tries, 1)
        moves = ((values != x_cur) & mask).any(dim=(3, 4))
        useful = moves.take(slots).any(dim=2, keepdim=True)
        # the first useful try (max's index is the first maximal one), or try 0 if none is
        found, first = useful.max(dim=1, keepdim=True)  # (N, 1, 1)
        # every try wasted: flipping every channel of try 0 changes each pixel (eps > 0)
        pick = signs.take_along_dim(first, dim=1) == found  # (N, 1, C)
        new = torch.where(pick.view(n, c, 1, 1), plus, minus)
        return torch.where(mask, new, x_cur)

    # ---- L2 ----------------------------------------------------------------------------------
    def _l2_init(self, q: Problem, restart: int, eps: Tensor) -> Tensor:
        """A grid of the eta pattern (squares of side min(H, W) // 5), one random sign per
        channel and square, a random transposition per square; rescaled to norm eps."""
        x = q.x
        n, c, h, w = x.shape
        s = max(1, min(h, w) // 5)
        gh, gw = h // s, w // s
        u = q.rng.uniform(0, restart, shape=(gh, gw, c + 1), dtype=torch.float64).to(x.device)
        sign = torch.where(u[..., :c] < 0.5, -1.0, 1.0)  # (N, gh, gw, C)
        eta = _eta(s).to(x.device)
        tiles = torch.where((u[..., c] < 0.5)[..., None, None], eta.T, eta)  # (N, gh, gw, s, s)
        tiles = tiles.unsqueeze(3) * sign[..., None, None]  # (N, gh, gw, C, s, s)
        grid = tiles.permute(0, 3, 1, 4, 2, 5).reshape(
            n, c, gh * s, gw * s
        )  # -> (N, C, gh*s, gw*s)
        delta = torch.zeros(n, c, h, w, dtype=torch.float64, device=x.device)
        top, left = (h - gh * s) // 2, (w - gw * s) // 2
        delta[:, :, top : top + gh * s, left : left + gw * s] = grid
        return self._l2_point(q, delta.to(x.dtype), eps)

    def _l2_point(self, q: Problem, delta: Tensor, eps: Tensor) -> Tensor:
        """x + delta rescaled to norm eps, clipped to the bounds."""
        norm = flat(delta).norm(dim=1).clamp_min(_TINY)
        return q.threat.clip(q.x + delta * per_sample(eps / norm, delta))

    def _l2_step(self, q: Problem, x_cur: Tensor, eps: Tensor, p_t: float, u: Tensor) -> Tensor:
        """Algorithm 3 of the paper, per sample and channel."""
        x = q.x
        n, c, h, w = x.shape
        s = max(int(round(math.sqrt(p_t * h * w))), 3)
        s += 1 - s % 2  # odd, so that the pattern has a centre
        while s > max(1, min(h, w) - 1):
            s -= 2
        s = max(s, 1)
        rows1, cols1, m1 = _windows(u[:, 0], u[:, 1], s, h, w)
        _, _, m2 = _windows(u[:, 2], u[:, 3], s, h, w)
        rho = torch.where(u[:, 4 : 4 + c] < 0.5, -1.0, 1.0).to(x.dtype)  # (N, C)
        eta = _eta(s).to(device=x.device, dtype=x.dtype)
        eta = torch.where((u[:, 4 + c] < 0.5).view(n, 1, 1), eta.T, eta)  # (N, s, s)

        nu = x_cur - x
        # advanced indexing of window W1: (N, C, s, s)
        win = (
            torch.arange(n, device=x.device).view(n, 1, 1, 1),
            torch.arange(c, device=x.device).view(1, c, 1, 1),
            rows1.view(n, 1, s, 1),
            cols1.view(n, 1, 1, s),
        )
        nu_w1 = nu[win]
        unused = (eps**2 - flat(nu).pow(2).sum(dim=1)).clamp_min(0)  # (N,)
        union = (nu * (m1 | m2)).pow(2).flatten(2).sum(dim=2)  # (N, C): mass of W1 u W2 per channel
        w1_norm = nu_w1.flatten(2).norm(dim=2).clamp_min(_TINY)  # (N, C)
        temp = rho[..., None, None] * eta.unsqueeze(1) + nu_w1 / w1_norm[..., None, None]
        avail = (union + unused.view(-1, 1) / c).sqrt()  # (N, C)
        temp_norm = temp.flatten(2).norm(dim=2).clamp_min(_TINY)
        nu = nu.masked_fill(m2, 0.0)
        nu[win] = temp * (avail / temp_norm)[..., None, None]
        return self._l2_point(q, nu, eps)
