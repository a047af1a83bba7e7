"""attack.repeat(n): fresh streams per repetition, only unbroken samples, the best kept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import advx
from advx._rng import derive_seed
from advx.attacks import Problem, Repeated, RunOutput, WorstCase, _lanes
from advx.errors import InputError

from ..conftest import CountingNet
from .test_analytic import _linear_problem

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


@dataclass(kw_only=True, eq=False)
class _Noise(advx.attacks.Attack):
    """A random point of the ball, no loss; records what each call saw."""

    calls: ClassVar[list[dict]] = []

    def _run(self, p: Problem) -> RunOutput:
        type(self).calls.append(
            {"seed": self.seed, "rng_seed": p.rng.seed, "index": p.rng.index.tolist()}
        )
        return RunOutput(p.threat.random_init(p.x, p.rng, 0))


@dataclass(kw_only=True, eq=False)
class _Overshoot(advx.attacks.Attack):
    """Minimum-norm on the linear model: across the plane by (1.05 + u) times the distance to
    it, u uniform from the sample's stream. ``w`` and ``b`` are the plane's."""

    w: torch.Tensor
    b: float
    minimum_norm: ClassVar[bool] = True
    norms: ClassVar[tuple[str, ...]] = ("l2",)
    calls: ClassVar[list[list[int]]] = []

    def _run(self, p: Problem) -> RunOutput:
        type(self).calls.append(p.rng.index.tolist())
        s = p.x.flatten(1) @ self.w + self.b  # signed, (N, D) -> (N,)
        unit = self.w / self.w.norm()
        u = p.rng.uniform(0, dtype=p.x.dtype)
        move = -(s / self.w.norm()) * (1.05 + u)  # (N,)
        return RunOutput(p.x + move.view(-1, 1) * unit)


def test_one_repetition_is_the_attack_itself(trained_mlp, batch):
    x, y = batch
    for attack in (advx.PGD(advx.Linf(0.05), steps=5), advx.Square(advx.Linf(0.05), queries=50)):
        a, r = attack(trained_mlp, x, y), attack.repeat(1)(trained_mlp, x, y)
        assert torch.equal(a.x_adv, r.x_adv) and torch.equal(a.success, r.success)
        assert torch.equal(a.queries, r.queries) and torch.equal(a.grads, r.grads)


def test_each_repetition_has_its_own_seed_and_runs_on_what_is_still_unbroken(trained_mlp, batch):
    x, y = batch
    _Noise.calls.clear()
    attack = _Noise(advx.Linf(0.4), seed=11)
    single = attack(trained_mlp, x, y)
    broken = single.success.nonzero().view(-1).tolist()
    assert 0 < len(broken) < len(x), "test setup: noise breaks some samples, not all"
    _Noise.calls.clear()
    r = attack.repeat(3)(trained_mlp, x, y)
    seeds = [11, derive_seed(11, 1), derive_seed(11, 2)]
    assert [c["seed"] for c in _Noise.calls] == seeds
    assert [c["rng_seed"] for c in _Noise.calls] == seeds
    assert _Noise.calls[0]["index"] == list(range(len(x)))
    # the second repetition skips what the first broke; the third what either broke
    assert _Noise.calls[1]["index"] == [i for i in range(len(x)) if i not in broken]
    later = r.trace["repetition"]
    assert set(_Noise.calls[2]["index"]) == {
        i for i in range(len(x)) if not (later[i] in (0, 1) and bool(r.success[i]))
    }
    # repetition 0 is the attack as it is: its successes and, without a loss to compare,
    # its points for the samples nothing broke
    assert torch.equal(r.x_adv[single.success], single.x_adv[single.success])
    none = ~r.success
    assert torch.equal(r.x_adv[none], single.x_adv[none])
    assert bool((later[none] == 0).all())
    assert bool(r.success[single.success].all()) and int(r.success.sum()) > len(broken)


def test_passes_are_counted_and_broken_samples_cost_nothing_more(trained_mlp, batch):
    x, y = batch
    steps, times = 5, 4
    attack = advx.PGD(advx.Linf(0.07), steps=steps, early_stop=False)
    single = attack(trained_mlp, x, y)
    counter = CountingNet(trained_mlp)
    r = attack.repeat(times)(counter, x, y)
    first = single.success
    assert 0 < int(first.sum()) < len(x)
    assert bool((r.grads[first] == steps).all())
    assert bool((r.grads[~r.success] == steps * times).all())
    assert int(r.queries.sum()) == counter.forward_rows
    assert int(r.grads.sum()) == counter.backward_rows
    assert r.name == "repeat(pgd,4)"
    assert r.params["times"] == times and r.params["attack"]["name"] == "pgd"
    # a repetition from other streams is a different run: it is not the restart of PGD(restarts=)
    assert int(r.trace["repetition"].max()) >= 1


def test_a_minimum_norm_attack_keeps_the_closest_over_repetitions_on_every_sample():
    net, x, y, w = _linear_problem()
    attack = _Overshoot(advx.L2(math.inf), w=w.detach(), b=float(net.b.detach()), seed=5)
    _Overshoot.calls.clear()
    r = attack.repeat(3)(net, x, y)
    assert _Overshoot.calls == [list(range(len(x)))] * 3  # eps inf: every sample every time
    each = torch.stack(
        [attack.with_seed(5 if k == 0 else derive_seed(5, k))(net, x, y).distance for k in range(3)]
    )  # (3, N)
    assert bool(r.success.all())
    assert torch.allclose(r.distance, each.min(dim=0).values)
    assert torch.equal(r.trace["repetition"], each.argmin(dim=0))
    assert len(set(r.trace["repetition"].tolist())) == 3, "test setup: each repetition wins some"


def test_a_minimum_norm_attack_with_a_finite_eps_stops_at_a_success_inside_it():
    net, x, y, w = _linear_problem()
    attack = _Overshoot(advx.L2(0.3), w=w.detach(), b=float(net.b.detach()))
    first = attack(net, x, y).success
    assert 0 < int(first.sum()) < len(x)
    _Overshoot.calls.clear()
    r = attack.repeat(2)(net, x, y)
    assert _Overshoot.calls[1] == [i for i in range(len(x)) if not bool(first[i])]
    assert bool(r.success[first].all())


def test_repeat_composes(trained_mlp, batch, monkeypatch):
    # counts the net's rows: eager compaction, whatever ADVX_COMPACT_EVERY says
    monkeypatch.setenv(_lanes.ENV, "1")
    x, y = batch
    pgd = advx.PGD(advx.Linf(0.05), steps=3)
    twice = pgd.repeat(2)
    assert isinstance(twice, Repeated) and twice.repeat(3).times == 6
    assert twice.repeat(3).attack is pgd
    assert twice.with_seed(4).seed == 4 and twice.with_seed(4).attack is pgd
    assert advx.Square(advx.Linf(0.1)).repeat(2).access == "scores"
    counter = CountingNet(trained_mlp)
    cascade = WorstCase([twice, advx.FGSM(advx.Linf(0.05)).repeat(2)], seed=3)
    r = cascade(counter, x, y)
    assert int(r.queries.sum()) == counter.forward_rows
    assert int(r.grads.sum()) == counter.backward_rows
    with pytest.raises(InputError, match="times"):
        pgd.repeat(0)
    with pytest.raises(InputError, match="attack"):
        Repeated("pgd", 2)  # type: ignore[arg-type]
