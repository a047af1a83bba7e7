"""The Boundary Attack (Brendel, Rauber & Bethge, ICLR 2018): a label-only minimum-L2 attack."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._tensor import flat
from .._validate import nonneg_float, one_of, positive_int
from ..errors import InputError
from ..threat import L2, ThreatModel
from ._base import Attack, Problem, RunOutput
from ._decision import Search, draw, sample_generators
from ._registry import register

KEY_STEP = 0xB0DA
# Success statistics: the last _SPHERICAL_WINDOW orthogonal steps and the last _STEP_WINDOW
# steps towards the original; the step sizes are revised every _ADAPT_EVERY steps. The
# orthogonal step alone is queried only every _SPHERICAL_EVERY steps: its success rate moves
# slowly, and querying it every step would double the cost of the walk.
_SPHERICAL_WINDOW, _STEP_WINDOW, _ADAPT_EVERY = 20, 20, 10
_SPHERICAL_EVERY = 5
# Rates of the steps towards the input above/below which that step grows/shrinks.
_STEP_UP, _STEP_DOWN = 0.25, 0.1
# A sample whose step towards the original fell below this has converged.
_CONVERGED = 1e-7


class _Window:
    """Per-sample ring buffers of the last successes (NaN: empty). A sample's window is full
    after ``first`` entries; each revision (``clear``) doubles that, up to ``last``."""

    def __init__(self, n: int, first: int, last: int, device: torch.device) -> None:
        self.data = torch.full((n, last), math.nan, device=device)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)
        self.need = torch.full((n,), first, dtype=torch.long, device=device)

    def push(self, rows: Tensor, value: Tensor, mask: Tensor) -> None:
        """Append ``value`` (R, k) where ``mask`` (R, k), left to right, for samples ``rows``."""
        size = self.data.shape[1]
        for j in range(value.shape[1]):
            m = mask[:, j]
            r = rows[m]
            self.data[r, self.pos[r] % size] = value[m, j].float()
            self.pos[r] += 1

    def rate(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(full, success rate) of samples ``rows``."""
        d = self.data[rows]
        count = (~torch.isnan(d)).sum(dim=1)
        return count >= self.need[rows], torch.nan_to_num(d).sum(dim=1) / count.clamp(min=1)

    def clear(self, rows: Tensor) -> None:
        self.data[rows] = math.nan
        self.need[rows] = torch.clamp(self.need[rows] * 2, max=self.data.shape[1])


@register("boundary")
@dataclass(kw_only=True, eq=False)
class Boundary(Attack):
    """Random walk along the decision boundary that shrinks the distance to the input.

    From an adversarial starting point, each step draws ``candidates`` proposals per sample: a
    random step orthogonal to the direction of the input, of relative size ``spherical_step``,
    that keeps the distance (the "spherical" candidate), followed by a step of relative size
    ``source_step`` towards the input. The combined proposal is queried every step, the
    spherical one alone every fifth step; the closest adversarial proposal becomes the new
    point. Every 10 steps, per sample, the success rates of the last orthogonal steps and of
    the last steps towards the input scale the two step sizes up or down by
    ``step_adaptation``. A step costs ``candidates`` queries (twice that every fifth); every
    sample stops at its own ``max_queries`` (the clean check
    aside), the model's budget, ``steps`` steps, when its step towards the input vanishes, or
    (with a finite eps) as soon as its point is inside the ball.

    ``init`` and the ``trace`` of the result are as for :class:`HopSkipJump`.
    """

    threat: ThreatModel = field(default_factory=lambda: L2(math.inf), kw_only=False)
    max_queries: int = 10_000
    steps: int | None = None
    spherical_step: float = 0.01
    source_step: float = 0.01
    step_adaptation: float = 1.5
    candidates: int = 1
    init: str = "noise"

    norms = ("l2",)
    minimum_norm = True
    access = "labels"

    def _check(self) -> None:
        positive_int(self.max_queries, name="max_queries", who="Boundary")
        if self.steps is not None:
            positive_int(self.steps, name="steps", who="Boundary")
        positive_int(self.candidates, name="candidates", who="Boundary")
        for name in ("spherical_step", "source_step", "step_adaptation"):
            nonneg_float(getattr(self, name), name=name, who="Boundary")
        if self.spherical_step == 0 or self.source_step == 0:
            raise InputError("Boundary: spherical_step and source_step must be > 0")
        if self.step_adaptation < 1:
            raise InputError(f"Boundary: step_adaptation must be >= 1, got {self.step_adaptation}")
        one_of(self.init, ("noise", "pool"), name="init", who="Boundary")

    def _run(self, p: Problem) -> RunOutput:
        s = Search(p, self.max_queries)
        n, dev, dtype = len(p), p.x.device, p.x.dtype
        lo, hi = p.threat.bounds
        x0, found = s.start_points(self.init)
        rows = found.nonzero().view(-1)
        if rows.numel():
            points, d = s.bisect(x0[rows], rows, s.theta())
            s.offer(rows, points, d)

        spherical = torch.full((n,), float(self.spherical_step), dtype=dtype, device=dev)
        source = torch.full((n,), float(self.source_step), dtype=dtype, device=dev)
        sph_stats = _Window(n, _SPHERICAL_WINDOW, _SPHERICAL_WINDOW, dev)
        step_stats = _Window(n, _STEP_WINDOW, _STEP_WINDOW, dev)
        max_steps = self.steps if self.steps is not None else math.inf
        k, shape = self.candidates, tuple(p.x.shape[1:])
        # one generator per sample for the whole walk: each step draws k directions from it
        gens = sample_generators(p.rng, KEY_STEP, device=dev)
        alive = found.clone()
        step = 0
        while step < max_steps:
            alive &= s.searching() & (source >= _CONVERGED)
            rows = alive.nonzero().view(-1)
            if rows.numel() == 0:
                break
            step += 1
            check = step % _SPHERICAL_EVERY == 0
            cost = 2 if check else 1
            k_i = torch.clamp(s.left()[rows] // cost, max=k)  # proposals each sample can pay for
            valid = torch.arange(k, device=dev).view(1, -1) < k_i.view(-1, 1)  # (R, k)
            x = flat(p.x[rows]).unsqueeze(1)  # (R, D) -> (R, 1, D)
            diff = x - flat(s.best[rows]).unsqueeze(1)  # towards the input, (R, 1, D)
            dist = diff.norm(dim=2, keepdim=True)  # (R, 1, 1)
            unit = diff / dist
            # a Gaussian step orthogonal to the direction of the input, scaled to spherical * dist
            eta = draw([gens[i] for i in rows.tolist()], "normal", (k, s.dim), dtype, dev)
            eta = eta - (eta * unit).sum(dim=2, keepdim=True) * unit
            sph = spherical[rows].view(-1, 1, 1)
            eta = eta * (sph * dist / eta.norm(dim=2, keepdim=True).clamp_min(1e-12))
            # back onto the sphere of radius dist around the input (Pythagoras), then into the box
            on_sphere = (x + (eta - diff) / torch.sqrt(1 + sph * sph)).clamp(lo, hi)
            # then towards the input by source * dist (corrected for the clipping's drift)
            towards = x - on_sphere
            t_norm = towards.norm(dim=2, keepdim=True).clamp_min(1e-12)
            length = (source[rows].view(-1, 1, 1) * dist + t_norm - dist).clamp(min=0)
            cand = (on_sphere + length / t_norm * towards).clamp(lo, hi)

            owner = rows.view(-1, 1).expand(-1, k)[valid]
            sph_adv = torch.zeros(valid.shape, dtype=torch.bool, device=dev)
            cand_adv = torch.zeros_like(sph_adv)
            if check:
                both = torch.cat([on_sphere[valid], cand[valid]]).view(-1, *shape)
                adv = s.is_adv(both, torch.cat([owner, owner]))
                sph_adv[valid], cand_adv[valid] = adv[: owner.numel()], adv[owner.numel() :]
            else:
                cand_adv[valid] = s.is_adv(cand[valid].view(-1, *shape), owner)

            # the closest adversarial proposal that is closer than the current point
            d = (cand - x).norm(dim=2)  # (R, k)
            d = torch.where(cand_adv & (d < dist.view(-1, 1)), d, torch.full_like(d, math.inf))
            j = d.argmin(dim=1)
            win = torch.isfinite(d.gather(1, j.view(-1, 1))).view(-1)
            if bool(win.any()):
                pick = cand[win, j[win]].view(-1, *shape)
                s.offer(rows[win], pick, d[win, j[win]])

            if check:
                sph_stats.push(rows, sph_adv, valid)
            step_stats.push(rows, cand_adv, valid)
            if step % _ADAPT_EVERY == 0:
                self._adapt(rows, sph_stats, step_stats, spherical, source)
        return s.result()

    def _adapt(
        self,
        rows: Tensor,
        sph_stats: _Window,
        step_stats: _Window,
        spherical: Tensor,
        source: Tensor,
    ) -> None:
        """The paper's step-size control, per sample: orthogonal steps that almost always stay
        adversarial mean the boundary is locally flat (both steps may grow); ones that rarely do
        mean it is curved (both shrink). Steps towards the input are tuned on their own rate."""
        a = self.step_adaptation
        full, rate = sph_stats.rate(rows)
        up, down = full & (rate > 0.5), full & (rate < 0.2)
        factor = torch.where(up, a, torch.where(down, 1 / a, 1.0)).to(spherical.dtype)
        spherical[rows] *= factor
        source[rows] *= factor
        sph_stats.clear(rows[up | down])
        full, rate = step_stats.rate(rows)
        up, down = full & (rate > _STEP_UP), full & (rate < _STEP_DOWN)
        source[rows] *= torch.where(up, a, torch.where(down, 1 / a, 1.0)).to(source.dtype)
        step_stats.clear(rows[up | down])
