"""One invariant harness, run over every registered attack, norm and mode (STYLE.md, Do 8).

An attack that does nothing, returns noise, leaks outside its threat model, lies about its
success or its query counts, depends on the batch it sits in, ignores its seed, mishandles a
per-sample eps with zeros in it or breaks in float64, or touches the caller's state fails here.
New attacks enter automatically through the registry; they only need a line in FAST (cheap
settings for a 32-sample batch), and a line in DETERMINISTIC if they draw no random numbers.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import advx
from advx import attacks
from advx._rng import SampleRNG
from advx.attacks import Problem, RunOutput, _lanes
from advx.models import Access, Classifier

from ..conftest import CountingNet

# Cheap settings per attack, so that the harness runs in seconds on two cores.
FAST: dict[str, dict] = {
    "fgsm": {},
    "pgd": {"steps": 10},
    "cw": {"steps": 60, "search_steps": 3, "initial_c": 1.0, "lr": 0.05},
    "apgd": {"steps": 20},
    "fab": {"steps": 20},
    "square": {"queries": 1000},
    "boundary": {"steps": 500},
    "hopskipjump": {"max_queries": 1000},
    "zoo": {"max_queries": 2000},
    "simba": {"max_queries": 500},
    "ddn": {"steps": 30},
    "fmn": {"steps": 30},
    "deepfool": {"steps": 20},
}
# Attacks that draw no random numbers with the FAST settings: their result must not change
# with the seed. Every other attack must change its result with it.
DETERMINISTIC = {"fgsm", "cw", "fab", "deepfool", "ddn", "fmn"}
# Settings for the seed test where FAST makes the random draws irrelevant: ZOO's 128 coordinates
# per step cover all 64 of its first resolution, so its draws only reorder them.
SEEDED: dict[str, dict] = {"zoo": {"coordinates": 16}}
# Known bugs the harness finds in code other work is rewriting; strict: the fix must remove them.
KNOWN: dict[tuple[str, str], str] = {}
# Budgets at which the MLP is clearly breakable and uniform noise clearly is not.
EPS = {"linf": 0.2, "l2": 2.5, "l1": 20.0}
N = 32
# The samples of the smaller runs (another seed, per-sample eps, float64, part of the batch).
PART = tuple(range(5, 17))
pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


def _cases(test: str = ""):
    for name in attacks.list_attacks():
        cls = attacks.get(name)
        known = KNOWN.get((test, name))
        marks = [pytest.mark.xfail(reason=known, strict=True)] if known else []
        for norm in cls.norms:
            for targeted in (False, True) if cls.supports_targeted else (False,):
                yield pytest.param(
                    name,
                    norm,
                    targeted,
                    id=f"{name}-{norm}-{'targeted' if targeted else 'untargeted'}",
                    marks=marks,
                )


CASES = list(_cases())
TARGETED = [case for case in CASES if case.values[2]]


def test_every_registered_attack_has_harness_settings():
    assert set(attacks.list_attacks()) <= set(FAST), "add cheap settings for the new attack to FAST"


def _threat(name: str, norm: str, eps: float | tuple[float | None, ...] | None = None):
    """The attack's threat: EPS (inf for a minimum-norm attack), a given eps, or one eps per
    sample (a tuple; None in it stands for the default eps)."""
    cls = attacks.get(name)
    default = math.inf if cls.minimum_norm else EPS[norm]
    if eps is None:
        return advx.ThreatModel(norm, default)
    if isinstance(eps, tuple):
        return advx.ThreatModel(norm, torch.tensor([default if e is None else e for e in eps]))
    return advx.ThreatModel(norm, eps)


def _model(net, access: Access):
    clf = Classifier(CountingNet(net))
    if access == "gradients":
        return clf
    return clf.as_blackbox(access)


def _counting(model) -> CountingNet:
    net = model.net if isinstance(model, Classifier) else model.classifier.net
    assert isinstance(net, CountingNet)
    return net


def _run(
    net,
    name: str,
    norm: str,
    targeted: bool,
    eps: float | tuple[float | None, ...] | None = None,
    seed: int = 0,
    rows: tuple | None = None,
    dtype: torch.dtype = torch.float32,
    tweak: tuple[tuple[str, object], ...] = (),
    eager: bool = False,
):
    """Run an attack once per configuration; the tests below read the cached outcome.
    ``eager``: with its inner loops compacting every iteration (no frozen rows); else at the
    period ``ADVX_COMPACT_EVERY`` sets (unset: the CPU's)."""
    every = "1" if eager else os.environ.get(_lanes.ENV, "")
    return _run_at(net, name, norm, targeted, eps, seed, rows, dtype, tweak, every)


@functools.cache
def _run_at(net, name, norm, targeted, eps, seed, rows, dtype, tweak, every: str):
    saved = os.environ.pop(_lanes.ENV, None)
    if every:
        os.environ[_lanes.ENV] = every
    try:
        return _attack_once(net, name, norm, targeted, eps, seed, rows, dtype, tweak)
    finally:
        os.environ.pop(_lanes.ENV, None)
        if saved is not None:
            os.environ[_lanes.ENV] = saved


def _attack_once(net, name, norm, targeted, eps, seed, rows, dtype, tweak):
    x, y = _data(net)
    target = _targets(y) if targeted else None
    if rows is not None:
        idx = torch.tensor(rows)
        x, y, target = x[idx], y[idx], None if target is None else target[idx]
    else:
        idx = torch.arange(len(x))
    cls = attacks.get(name)
    if dtype != torch.float32:
        net, x = _converted(net, dtype), x.to(dtype)
    model = _model(net, cls.access)
    attack = attacks.create(
        name, _threat(name, norm, eps), seed=seed, **{**FAST[name], **dict(tweak)}
    )
    # warm-up on the same batch: the classifier measures its chunk sizes once per input shape, and
    # those timing passes are not the attack's
    attack(model, x, y, target=target, index=idx)
    counter = _counting(model)
    counter.reset()
    x_in, y_in = x.clone(), y.clone()
    state = torch.get_rng_state()
    grads_before = [None if p.grad is None else p.grad.clone() for p in counter.parameters()]
    result = attack(model, x, y, target=target, index=idx)
    side = {
        "x_untouched": torch.equal(x, x_in) and torch.equal(y, y_in),
        "rng_untouched": torch.equal(state, torch.get_rng_state()),
        "forward_rows": counter.forward_rows,
        "backward_rows": counter.backward_rows,
        "net_training": counter.training,
        "param_grads_kept": all(
            (a is None and p.grad is None)
            or (a is not None and p.grad is not None and torch.equal(a, p.grad))
            for a, p in zip(grads_before, counter.parameters())
        ),
    }
    return x, y, target, result, side


@functools.cache
def _converted(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(net).to(dtype)


@functools.cache
def _data(net):
    from advx.data import load

    x, y = load("mnist-demo", split="test")
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    return x[ok][:N].clone(), y[ok][:N].clone()


def _targets(y):
    return attacks.random_targets(y, 10, seed=3)


@pytest.fixture(scope="module")
def net(trained_mlp):
    return trained_mlp


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_shapes_dtypes_devices_kept(net, name, norm, targeted):
    x, y, target, r, _ = _run(net, name, norm, targeted)
    assert r.x_adv.shape == x.shape and r.x_adv.dtype == x.dtype and r.x_adv.device == x.device
    assert r.success.shape == (N,) and r.success.dtype == torch.bool
    assert r.distance.shape == (N,) and r.queries.shape == (N,) and r.grads.shape == (N,)
    assert r.queries.dtype == torch.long and r.grads.dtype == torch.long
    assert r.name == name and set(r.params) == set(attacks.get(name).param_names())


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_inside_threat_model_and_bounds(net, name, norm, targeted):
    x, y, target, r, _ = _run(net, name, norm, targeted)
    assert bool(r.threat.contains(r.x_adv, x).all())
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    assert torch.allclose(r.distance, r.threat.distance(r.x_adv, x))


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_reported_success_is_real(net, name, norm, targeted):
    x, y, target, r, _ = _run(net, name, norm, targeted)
    with torch.no_grad():
        pred = net(r.x_adv).argmax(1)
    truth = pred == target if targeted else pred != y
    assert torch.equal(truth, r.success)


def check_beats_noise(net, x, y, target, r) -> None:
    """The attack breaks most of an undefended model, and far more than noise of its size."""
    n = len(x)
    threat = r.threat
    if threat.unbounded:  # minimum-norm: compare with noise at the attack's median distance
        threat = threat.with_eps(
            float(r.distance[r.success].median()) if bool(r.success.any()) else 0.0
        )
    noise = threat.random_init(x, SampleRNG(123, torch.arange(n)))
    with torch.no_grad():
        pred = net(noise).argmax(1)
    noise_rate = float(
        (pred == target).float().mean() if target is not None else (pred != y).float().mean()
    )
    floor = 0.5 if target is not None else 0.6
    assert r.success_rate >= floor, f"{r.name} broke only {r.success_rate:.0%} of an undefended MLP"
    assert r.success_rate >= noise_rate + 0.3, (
        f"{r.name} {r.success_rate:.0%} vs noise {noise_rate:.0%}"
    )


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_beats_uniform_noise_at_the_same_eps(net, name, norm, targeted):
    x, y, target, r, _ = _run(net, name, norm, targeted)
    check_beats_noise(net, x, y, target, r)


@dataclass(kw_only=True, eq=False)
class _DoesNothing(attacks.Attack):
    def _run(self, p: Problem) -> RunOutput:
        return RunOutput(p.x)


@dataclass(kw_only=True, eq=False)
class _UniformNoise(attacks.Attack):
    def _run(self, p: Problem) -> RunOutput:
        return RunOutput(p.threat.random_init(p.x, p.rng, 0))


@pytest.mark.parametrize("fake", [_DoesNothing, _UniformNoise])
def test_the_harness_fails_an_attack_that_does_nothing(net, fake):
    x, y = _data(net)
    r = fake(advx.Linf(EPS["linf"]))(net, x, y)
    with pytest.raises(AssertionError):
        check_beats_noise(net, x, y, None, r)


@pytest.mark.parametrize("name,norm,targeted", TARGETED)
def test_targeted_reaches_the_target(net, name, norm, targeted):
    x, y, target, r, _ = _run(net, name, norm, targeted)
    with torch.no_grad():
        pred = net(r.x_adv[r.success]).argmax(1)
    assert torch.equal(pred, target[r.success])
    assert r.success.float().mean() >= 0.5


def _padded(name: str) -> bool:
    """Whether the attack's loops may keep done rows in the batch, frozen and uncharged: its
    model is paddable (the harness gives a gradient attack a Classifier, the others a black
    box) and the loops compact less often than every iteration (``ADVX_COMPACT_EVERY``, else
    the CPU's setting; 1 by default, where every check below is the strict one)."""
    every = int(os.environ.get(_lanes.ENV, "").strip() or _lanes.COMPACT_EVERY["cpu"])
    return attacks.get(name).access == "gradients" and every > 1


def check_counts(net, name, norm, targeted, r, side, *args) -> None:
    """The charged passes are the passes of the rows the attack ran: with eager compaction,
    exactly the rows the net saw; with frozen rows riding along, the eager run's charges, and
    no more than the rows the net saw."""
    if not _padded(name):
        assert int(r.queries.sum()) == side["forward_rows"]
        assert int(r.grads.sum()) == side["backward_rows"]
        return
    _, _, _, eager, eager_side = _run(net, name, norm, targeted, *args, eager=True)
    assert int(eager.queries.sum()) == eager_side["forward_rows"]
    assert int(eager.grads.sum()) == eager_side["backward_rows"]
    assert torch.equal(r.queries, eager.queries) and torch.equal(r.grads, eager.grads)
    assert int(r.queries.sum()) <= side["forward_rows"]
    assert int(r.grads.sum()) <= side["backward_rows"]


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_counted_passes_equal_the_models_calls(net, name, norm, targeted):
    _, _, _, r, side = _run(net, name, norm, targeted)
    check_counts(net, name, norm, targeted, r, side)
    assert bool((r.queries >= 1).all())  # at least the clean check
    if attacks.get(name).access != "gradients":
        assert side["backward_rows"] == 0 and int(r.grads.sum()) == 0


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_callers_state_is_left_alone(net, name, norm, targeted):
    _, _, _, _, side = _run(net, name, norm, targeted)
    assert side["x_untouched"], "the attack modified its inputs"
    assert side["rng_untouched"], "the attack consumed the global random state"
    assert side["net_training"] is True, "CountingNet was in training mode and must come back so"
    assert side["param_grads_kept"], "the attack changed the .grad of the weights"


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_same_seed_same_bits(net, name, norm, targeted):
    _, _, _, r, _ = _run(net, name, norm, targeted)
    _, _, _, again, _ = _run(net, name, norm, targeted, None, 0, tuple(range(N)))
    assert torch.equal(r.x_adv, again.x_adv)
    assert torch.equal(r.queries, again.queries)


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_another_seed_changes_a_randomized_attack(net, name, norm, targeted):
    tweak = tuple(SEEDED.get(name, {}).items())
    _, _, _, seed0, _ = _run(net, name, norm, targeted, None, 0, PART, torch.float32, tweak)
    _, _, _, seed1, _ = _run(net, name, norm, targeted, None, 1, PART, torch.float32, tweak)
    if name in DETERMINISTIC:
        assert torch.equal(seed1.x_adv, seed0.x_adv), f"{name} is listed as deterministic"
        assert torch.equal(seed1.queries, seed0.queries)
    else:
        assert not torch.equal(seed1.x_adv, seed0.x_adv), (
            f"{name} gave the same bits with seed 1 as with seed 0: it ignores its seed (or it "
            "draws no random numbers: then list it in DETERMINISTIC)"
        )
        assert seed1.params["seed"] == 1


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_result_does_not_depend_on_the_batch(net, name, norm, targeted):
    _, _, _, r, _ = _run(net, name, norm, targeted)
    _, _, _, part, _ = _run(net, name, norm, targeted, None, 0, PART)
    idx = torch.tensor(PART)
    assert torch.equal(part.success, r.success[idx])
    assert torch.equal(part.queries, r.queries[idx])
    assert torch.allclose(part.x_adv, r.x_adv[idx], atol=1e-5)


@pytest.mark.parametrize("name,norm,targeted", list(_cases("test_per_sample_eps_with_zeros")))
def test_per_sample_eps_with_zeros(net, name, norm, targeted):
    """Samples with eps 0 come back unchanged and unbroken; the others are attacked exactly as
    with the same eps for the whole batch."""
    zero = torch.arange(len(PART)) % 3 == 0
    eps = tuple(0.0 if z else None for z in zero.tolist())
    x, _, _, r, side = _run(net, name, norm, targeted, eps, 0, PART)
    _, _, _, whole, _ = _run(net, name, norm, targeted, None, 0, PART)
    assert torch.equal(r.x_adv[zero], x[zero])
    assert not bool(r.success[zero].any())
    assert bool((r.distance[zero] == 0).all())
    assert torch.equal(r.success[~zero], whole.success[~zero])
    assert bool(r.success[~zero].any()), f"{name} attacked none of the samples with eps > 0"
    assert torch.equal(r.queries[~zero], whole.queries[~zero])
    assert torch.allclose(r.x_adv[~zero], whole.x_adv[~zero], atol=1e-5)
    check_counts(net, name, norm, targeted, r, side, eps, 0, PART)


@pytest.mark.parametrize("name,norm,targeted", CASES)
def test_float64(net, name, norm, targeted):
    """In float64 the result stays float64, inside the threat model, with a true success flag,
    exact pass counts, and about the float32 result."""
    x, y, target, r, side = _run(net, name, norm, targeted, None, 0, PART, torch.float64)
    assert x.dtype == torch.float64 and r.x_adv.dtype == torch.float64
    assert r.distance.dtype == torch.float64
    assert bool(r.threat.contains(r.x_adv, x).all())
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    with torch.no_grad():
        pred = _converted(net, torch.float64)(r.x_adv).argmax(1)
    assert torch.equal(pred == target if targeted else pred != y, r.success)
    check_counts(net, name, norm, targeted, r, side, None, 0, PART, torch.float64)
    _, _, _, single, _ = _run(net, name, norm, targeted, None, 0, PART)
    agree = (r.success == single.success).float().mean()
    assert agree >= 0.75, f"{name} in float64 agrees with float32 on {agree:.0%} of the samples"
