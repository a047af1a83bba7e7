"""APGD: stronger than PGD at equal cost, the paper's step-size schedule, the DLR losses, APGD-T's
sweep over target classes, explicit targets and early stopping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import advx
from advx.attacks import APGD, PGD
from advx.attacks._losses import dlr, dlr_targeted
from advx.attacks.apgd import _sparse_sign, checkpoints
from advx.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


@pytest.fixture(scope="module")
def digits(mnist_test, trained_mlp):
    """128 correctly classified test digits: enough for strength comparisons, still cheap."""
    x, y = mnist_test
    with torch.no_grad():
        ok = trained_mlp(x).argmax(1) == y
    return x[ok][:128].clone(), y[ok][:128].clone()


# ---- strength -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "threat", [advx.Linf(0.06), advx.L2(0.9), advx.L1(6.0)], ids=["linf", "l2", "l1"]
)
def test_apgd_ce_at_least_as_strong_as_pgd_with_the_same_gradient_steps(
    trained_mlp, digits, threat
):
    x, y = digits
    steps = 20
    pgd = PGD(threat, steps=steps)(trained_mlp, x, y)
    apgd = APGD(threat, steps=steps)(trained_mlp, x, y)
    assert (
        int(apgd.grads.max()) == steps and int(pgd.grads.max()) == steps
    )  # the same gradient budget
    assert 0.2 < pgd.success_rate < 0.9, "the budget must leave both attacks work to do"
    assert apgd.success_rate < 1.0
    assert int(apgd.success.sum()) >= int(pgd.success.sum())


def test_a_sample_never_broken_costs_steps_plus_two_forwards_and_no_final_pass(trained_mlp, digits):
    x, y = digits
    r = APGD(advx.Linf(1e-3), steps=12)(trained_mlp, x[:8], y[:8])
    assert not bool(r.success.any())
    # the clean check, 12 passes with gradients, the last step's point; nothing more
    assert r.queries.tolist() == [14] * 8 and r.grads.tolist() == [12] * 8


# ---- the step-size schedule -------------------------------------------------------------------
def test_checkpoints_for_100_steps_are_the_papers():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (the next, 1.05, is past the end)
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_checkpoints_scale_with_the_number_of_steps():
    assert checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    assert checkpoints(20) == [0, 5, 9, 12, 14, 16, 18, 19]  # ceil(p_j * 20)
    assert checkpoints(1) == [0]


class _Peak(nn.Module):
    """Three classes on one coordinate: the loss of class 0 peaks at u = 0.5, where class 1 comes
    closest to winning without ever winning. Sign steps of a fixed size keep jumping over it."""

    def forward(self, x):
        u = x[:, 0]
        other = -40.0 * (u - 0.5) ** 2
        return torch.stack([torch.ones_like(u), other, torch.full_like(u, -5.0)], dim=1)


def test_halving_the_step_size_homes_in_on_an_interior_maximum():
    """Per sample, the best point ends within a small fraction of eps of the loss's peak: only
    repeated halvings of the initial 2 * eps step get there."""
    x = torch.tensor([[0.37], [0.45], [0.58], [0.66]])
    y = torch.zeros(4, dtype=torch.long)
    r = APGD(advx.Linf(0.2), steps=100)(_Peak(), x, y)
    assert not bool(r.success.any())
    miss = (r.x_adv[:, 0] - 0.5).abs()
    assert bool((miss < 2 * 0.2 / 2**6).all()), miss  # at least six halvings


def test_l1_steps_move_each_samples_share_of_its_largest_free_coordinates():
    grad = torch.tensor([[4.0, -3.0, 2.0, -1.0, 0.5], [4.0, -3.0, 2.0, -1.0, 0.5]])
    x = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.5], [0.5, 0.0, 0.5, 0.5, 0.5]])
    # sample 0: coordinate 0 is at the upper bound and pushed up, so the top 2 free ones are 1, 2;
    # sample 1: coordinate 1 is at the lower bound and pushed down; its top 3 free ones are 0, 2, 3
    step = _sparse_sign(grad, x, torch.tensor([0.4, 0.6]), (0.0, 1.0))
    assert torch.allclose(step[0], torch.tensor([0.0, -0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(step[1], torch.tensor([1 / 3, 0.0, 1 / 3, -1 / 3, 0.0]))


# ---- the losses -------------------------------------------------------------------------------
_logits = st.lists(
    st.floats(-50, 50, allow_nan=False, width=32), min_size=5, max_size=5, unique=True
)


@settings(max_examples=60, deadline=None)
@given(
    z=_logits,
    label=st.integers(0, 4),
    target=st.integers(0, 4),
    shift=st.floats(-100, 100),
    scale=st.floats(0.1, 10),
)
def test_dlr_is_invariant_to_shifting_and_scaling_the_logits(z, label, target, shift, scale):
    z = torch.tensor([z], dtype=torch.float64)
    if float(z.sort(descending=True).values[0, 0] - z.sort(descending=True).values[0, 2]) < 1e-3:
        return  # a near-zero scale: the 1e-12 guard, not the ratio, decides the value
    moved = z * scale + shift
    y, t = torch.tensor([label]), torch.tensor([target])
    assert torch.allclose(dlr(moved, y), dlr(z, y), rtol=1e-6, atol=1e-9)
    if target != label:
        assert torch.allclose(dlr_targeted(moved, t), dlr_targeted(z, t), rtol=1e-6, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(z=_logits, label=st.integers(0, 4))
def test_dlr_is_positive_exactly_when_adversarial(z, label):
    # DLR divides the margin by a logit spread of up to ~100: a margin of a few subnormal ulps
    # (hypothesis found 1.4e-45) underflows to 0, a tie in float32 that no attack acts on
    top = sorted(z)[-2:]
    assume(top[1] - top[0] > 1e-30)
    z = torch.tensor([z])
    c = torch.tensor([label])
    wins = int(z.argmax(1)) == label
    assert (float(dlr(z, c)) > 0) == (not wins)  # untargeted: the true class lost
    assert (float(dlr_targeted(z, c)) > 0) == wins  # targeted: the target won


def test_dlr_values_match_the_papers_formulas():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0, -3.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    # -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) = -(3 - 1) / (3 - 0)
    assert torch.allclose(dlr(z, y), torch.tensor([-2.0 / 3.0]))
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - 0) / (3 - (0 - 1) / 2)
    assert torch.allclose(dlr_targeted(z, t), torch.tensor([-3.0 / 3.5]))
    # the targeted DLR rises as the target's logit does, and the true class's falls
    assert float(dlr_targeted(z + torch.tensor([[0, 0, 0.5, 0, 0]]), t)) > float(dlr_targeted(z, t))
    assert float(dlr_targeted(z - torch.tensor([[0.5, 0, 0, 0, 0]]), t)) > float(dlr_targeted(z, t))
    # dlr with targeted=True is the targeted DLR
    assert torch.equal(dlr(z, t, targeted=True), dlr_targeted(z, t))


def test_dlr_needs_enough_classes():
    with pytest.raises(InputError, match="at least 3 classes"):
        dlr(torch.zeros(1, 2), torch.tensor([0]))
    with pytest.raises(InputError, match="at least 4 classes"):
        dlr_targeted(torch.zeros(1, 3), torch.tensor([0]))


# ---- APGD-T and explicit targets ----------------------------------------------------------------
D = 64  # pixels of the toy model below


class _OnlyClass3CanWin(nn.Module):
    """Four classes, true class 0 (logit 0). Classes 1 and 2 have the highest other clean logits
    but are constants: no perturbation makes them win. Class 3 has the lowest clean logit but
    rises with the pixel sum, enough to win inside Linf(0.2)."""

    def forward(self, x):
        s = x.flatten(1).sum(dim=1)  # (N, 1, 8, 8) -> (N,)
        n = x.shape[0]
        z3 = -2.0 + 0.4 * (
            s - 0.45 * D
        )  # -2 at the clean inputs below, up to about 3 inside the ball
        return torch.stack(
            [torch.zeros(n), torch.full((n,), -0.5), torch.full((n,), -1.0), z3], dim=1
        )


@pytest.fixture()
def toy():
    x = torch.full((4, 1, 8, 8), 0.45)
    return _OnlyClass3CanWin(), x, torch.zeros(4, dtype=torch.long)


def test_apgd_t_moves_on_to_later_targets_when_the_first_ones_fail(toy):
    net, x, y = toy
    threat = advx.Linf(0.2)
    steps = 10
    first_only = APGD(threat, loss="dlr-targeted", targets=1, steps=steps)(net, x, y)
    second_too = APGD(threat, loss="dlr-targeted", targets=2, steps=steps)(net, x, y)
    all_three = APGD(threat, loss="dlr-targeted", targets=3, steps=steps)(net, x, y)
    assert not bool(first_only.success.any()) and not bool(second_too.success.any())
    assert bool(all_three.success.all())
    with torch.no_grad():
        assert bool((net(all_three.x_adv).argmax(1) == 3).all())
    # targets 1 and 2 ran in full and failed, target 3 then broke every sample
    assert bool((all_three.grads > 2 * steps).all())
    assert first_only.grads.tolist() == [steps] * 4 and second_too.grads.tolist() == [2 * steps] * 4


def test_apgd_t_targets_are_the_most_likely_classes_per_sample(trained_mlp, digits):
    """With one target, APGD-T is the targeted attack at each sample's runner-up class."""
    x, y = digits
    x, y = x[:32], y[:32]
    with torch.no_grad():
        runner_up = trained_mlp(x).scatter(1, y.view(-1, 1), -math.inf).argmax(1)
    threat = advx.Linf(0.1)
    sweep = APGD(threat, loss="dlr-targeted", targets=1, steps=15)(trained_mlp, x, y)
    aimed = APGD(threat, loss="dlr-targeted", steps=15)(trained_mlp, x, y, target=runner_up)
    # the same loss on the same class from the same start: the same points until success; only
    # the success criterion differs (any wrong class vs the target), so APGD-T wins at least as
    # often
    assert bool((sweep.success | ~aimed.success).all())
    assert 0.3 < sweep.success_rate < 1.0


@pytest.mark.parametrize("loss", ["ce", "dlr-targeted"])
def test_an_explicit_target_is_reached(toy, loss):
    net, x, y = toy
    r = APGD(advx.Linf(0.2), loss=loss, steps=10)(net, x, y, target=3)
    assert bool(r.success.all())
    with torch.no_grad():
        assert bool((net(r.x_adv).argmax(1) == 3).all())
    # an unreachable target stays unreached: success means the target, not any wrong class
    r = APGD(advx.Linf(0.2), loss=loss, steps=10)(net, x, y, target=1)
    assert not bool(r.success.any())


def test_an_explicit_target_on_the_mlp(trained_mlp, digits):
    x, y = digits
    x, y = x[:32], y[:32]
    target = advx.attacks.random_targets(y, 10, seed=1)
    r = APGD(advx.Linf(0.2), loss="dlr-targeted", steps=20)(trained_mlp, x, y, target=target)
    assert r.success_rate >= 0.75  # 29 of these 32 are reachable at all (100 steps of any attack)
    with torch.no_grad():
        pred = trained_mlp(r.x_adv).argmax(1)
    assert torch.equal(pred == target, r.success)


# ---- early stopping and restarts ----------------------------------------------------------------
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_early_stop_saves_passes_and_loses_no_success(trained_mlp, digits, loss):
    x, y = digits
    x, y = x[:48], y[:48]
    threat = advx.Linf(0.06)
    eager = APGD(threat, loss=loss, steps=20, early_stop=True)(trained_mlp, x, y)
    full = APGD(threat, loss=loss, steps=20, early_stop=False)(trained_mlp, x, y)
    assert 0.2 < eager.success_rate < 1.0
    assert torch.equal(eager.success, full.success)
    # the same trajectories: each broken sample keeps the same first adversarial point
    assert torch.allclose(eager.x_adv[eager.success], full.x_adv[full.success], atol=1e-5)
    assert bool((eager.grads <= full.grads).all())
    assert int(eager.grads.sum()) < int(full.grads.sum())


def test_restarts_run_only_on_samples_still_unbroken(trained_mlp, digits):
    x, y = digits
    x, y = x[:48], y[:48]
    threat = advx.Linf(0.05)
    one = APGD(threat, steps=10, restarts=1)(trained_mlp, x, y)
    three = APGD(threat, steps=10, restarts=3)(trained_mlp, x, y)
    # restart 0 is the same run; later restarts only add successes
    assert bool((three.success | ~one.success).all())
    assert torch.equal(three.grads[one.success], one.grads[one.success])
    assert bool((three.grads[~three.success] == 30).all())


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(InputError, match="loss"):
        APGD(advx.Linf(0.1), loss="dlr_targeted")
    with pytest.raises(InputError, match="rho"):
        APGD(advx.Linf(0.1), rho=1.5)
    with pytest.raises(InputError, match="steps"):
        APGD(advx.Linf(0.1), steps=0)
    with pytest.raises(InputError, match="not a minimum-norm attack"):
        APGD(advx.Linf(math.inf))


def test_ups_counted_at_the_checkpoint_equal_the_step_by_step_count():
    """_ups over a stretch's losses (ties, -inf and NaN included) is the count that
    ``ups += loss > loss_prev`` keeps step by step."""
    from advx.attacks.apgd import _ups

    g = torch.Generator().manual_seed(0)
    losses = [torch.randint(0, 3, (9,), generator=g).float() for _ in range(6)]
    losses[0][0] = float("-inf")
    losses[2][1] = float("nan")
    losses[4][2] = float("nan")
    ups = torch.zeros(9, dtype=torch.long)
    for prev, cur in zip(losses, losses[1:]):
        ups = ups + (cur > prev)
    assert _ups(losses).dtype == torch.long
    assert torch.equal(_ups(losses), ups)
    assert torch.equal(_ups(losses[:1]), torch.zeros(9, dtype=torch.long))
