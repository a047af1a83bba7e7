"""The recipes: each crafts the point its paper says, inside the threat model, and computes its
loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advx
from advx._rng import SampleRNG, derive_seed
from advx.errors import InputError
from advx.training import Batch, Schedule, distillation, fgsm_rs, fit, pgd_at, standard, trades


class Binary(nn.Module):
    """Two classes with logits (0, w.x + b): the cross-entropy's input gradient always points
    along -w for class 1 and +w for class 0, whatever the point."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b), dtype=w.dtype))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b  # (N, D) -> (N,)
        return torch.stack([torch.zeros_like(s), s], dim=1)


class Recorder(nn.Module):
    """Wraps a net and keeps the inputs of the passes that ask for weight gradients."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen = []

    def forward(self, x):
        if not x.requires_grad:
            self.seen.append(x.detach().clone())
        return self.net(x)


def _problem(n=16, d=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = 0.2 + 0.6 * torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 2
    return Binary(w), x, y, w


def _batch(net, x, y, *, epoch=0, seed=0, index=None):
    fwd = lambda t: net(t)
    return Batch(
        x, y, torch.arange(x.shape[0]) if index is None else index, epoch, seed, fwd, fwd, net
    )


def _crafted(recipe, net, x, y, **kw):
    rec = Recorder(net)
    step = recipe(_batch(rec, x, y, **kw))
    return rec.seen[-1], step


def _corner(w, x, y, eps):
    """The loss maximizer over the Linf ball and [0, 1] for the Binary model."""
    s = torch.where(y.view(-1, 1) == 1, -w.sign(), w.sign())
    return (x + eps * s).clamp(0, 1)


def test_fgsm_rs_with_a_long_step_reaches_the_fgsm_corner():
    net, x, y, w = _problem()
    x_adv, step = _crafted(fgsm_rs(0.1, alpha=0.25), net, x, y)
    assert torch.allclose(x_adv, _corner(w, x, y, 0.1), atol=1e-12)
    assert torch.allclose(step.loss, F.cross_entropy(net(x_adv), y, reduction="none"))
    assert step.adv_logits is not None and step.logits is None


def test_fgsm_rs_takes_one_step_of_alpha_from_a_uniform_start_and_stays_in_the_ball():
    net, x, y, w = _problem(n=64, d=200)
    eps, alpha = 0.1, 0.01
    x_adv, _ = _crafted(fgsm_rs(eps, alpha=alpha), net, x, y)
    assert float((x_adv - x).abs().max()) <= eps + 1e-12
    start = advx.Linf(eps).random_init(x, SampleRNG(derive_seed(0, 0x7A11, 0, 0), torch.arange(64)))
    s = torch.where(y.view(-1, 1) == 1, -w.sign(), w.sign())
    assert torch.allclose(x_adv, advx.Linf(eps).project(start + alpha * s, x), atol=1e-12)
    # the start is uniform in the ball: mean |delta| near eps / 2
    assert abs(float((start - x).abs().mean()) - eps / 2) < 0.01


def test_fgsm_rs_takes_its_gradient_at_the_unclipped_start_as_wong_et_al_do():
    seen = []

    class Spy(nn.Module):
        def forward(self, t):
            if t.requires_grad:
                seen.append(t.detach().clone())
            return torch.stack([t.flatten(1).sum(1), -t.flatten(1).sum(1)], dim=1)

    x = torch.zeros(4, 100, dtype=torch.float64)  # every pixel on the lower bound
    y = torch.zeros(4, dtype=torch.long)
    x_adv, _ = _crafted(fgsm_rs(0.2), Spy(), x, y)
    start = seen[0]
    assert (
        float(start.min()) < -0.1 and float(start.max()) > 0.1
    )  # uniform in [-eps, eps], not clipped
    assert (
        float(x_adv.min()) >= 0 and float(x_adv.max()) <= 0.2 + 1e-12
    )  # the crafted point is projected
    _crafted(fgsm_rs(0.2, clip_start=True), Spy(), x, y)
    assert float(seen[-1].min()) >= 0


def test_random_starts_depend_on_the_sample_and_epoch_not_on_the_batch():
    net, x, y, _ = _problem(n=8, d=50)
    r = fgsm_rs(0.1, alpha=0.0001)
    full, _ = _crafted(r, net, x, y, index=torch.arange(8) + 100)
    part, _ = _crafted(r, net, x[3:6], y[3:6], index=torch.arange(3, 6) + 100)
    assert torch.equal(full[3:6], part)
    other_epoch, _ = _crafted(r, net, x, y, index=torch.arange(8) + 100, epoch=1)
    assert not torch.equal(full, other_epoch)


def test_pgd_at_with_enough_steps_reaches_the_corner_from_a_random_start():
    net, x, y, w = _problem()
    x_adv, step = _crafted(pgd_at(0.1, steps=8, step_size=0.03), net, x, y)
    assert torch.allclose(x_adv, _corner(w, x, y, 0.1), atol=1e-12)
    assert torch.allclose(step.loss, F.cross_entropy(net(x_adv), y, reduction="none"))


@pytest.mark.parametrize("epoch, eps", [(0, 0.1 / 3), (1, 0.2 / 3), (2, 0.1), (7, 0.1)])
def test_pgd_at_warmup_grows_the_budget_linearly_over_the_first_epochs(epoch, eps):
    net, x, y, w = _problem()
    x_adv, _ = _crafted(pgd_at(0.1, steps=8, step_size=0.03, warmup=2), net, x, y, epoch=epoch)
    assert torch.allclose(
        x_adv, _corner(w, x, y, eps), atol=1e-12
    )  # the corner of the smaller ball


def test_fgsm_rs_warmup_shrinks_the_ball_and_the_step_alike():
    net, x, y, w = _problem()
    x_adv, _ = _crafted(fgsm_rs(0.1, alpha=1.0, warmup=3), net, x, y, epoch=1)  # half the budget
    assert torch.allclose(x_adv, _corner(w, x, y, 0.05), atol=1e-12)


def test_pgd_at_default_step_is_madrys_rule():
    assert pgd_at(0.3, steps=40).params["step_size"] == pytest.approx(2.5 * 0.3 / 40)
    assert fgsm_rs(0.3).params["alpha"] == pytest.approx(0.375)  # 1.25 eps


def test_trades_loss_is_ce_plus_beta_kl_at_a_point_that_raises_the_kl():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(30, 20), nn.Tanh(), nn.Linear(20, 4)).double()
    x = 0.2 + 0.6 * torch.rand(12, 30, dtype=torch.float64)
    y = torch.arange(12) % 4
    eps, beta = 0.1, 3.0
    x_adv, step = _crafted(trades(eps, beta=beta, steps=10), net, x, y)
    assert float((x_adv - x).abs().max()) <= eps + 1e-12

    def kl(xa):
        p = F.log_softmax(net(x), 1)
        q = F.log_softmax(net(xa), 1)
        return (p.exp() * (p - q)).sum(1)

    want = F.cross_entropy(net(x), y, reduction="none") + beta * kl(x_adv)
    assert torch.allclose(step.loss, want, atol=1e-10)
    # the inner maximization beats random points of the ball on every sample
    g = torch.Generator().manual_seed(1)
    best_random = torch.stack(
        [
            kl((x + eps * (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1)).clamp(0, 1))
            for _ in range(20)
        ]
    ).amax(0)
    assert bool((kl(x_adv) > best_random).all())
    # beta = 0 is plain cross-entropy on the clean inputs
    _, plain = _crafted(trades(eps, beta=0.0, steps=2), net, x, y)
    assert torch.allclose(plain.loss, F.cross_entropy(net(x), y, reduction="none"))


def test_trades_crafts_in_eval_mode_and_trains_in_train_mode():
    modes = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(30, 3).double()

        def forward(self, x):
            modes.append((self.training, x.requires_grad))
            return self.lin(x)

    net = Spy()
    x = torch.rand(4, 30, dtype=torch.float64)
    trades(0.1, steps=2)(_batch(net, x, torch.zeros(4, dtype=torch.long)))
    crafting = [m for m, g in modes if g]
    assert crafting and not any(crafting)  # every crafting pass in eval mode
    assert modes[-1][0] and modes[-2][0]  # the two loss passes in training mode
    assert net.training


def test_standard_divides_the_logits_by_the_temperature():
    net, x, y, _ = _problem()
    step = standard(temperature=4.0)(_batch(net, x, y))
    assert torch.allclose(step.loss, F.cross_entropy(net(x) / 4.0, y, reduction="none"))


def test_distillation_is_cross_entropy_to_the_teachers_soft_labels_at_temperature_t():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(30, 5)).double()
    student = nn.Sequential(nn.Flatten(), nn.Linear(30, 5)).double()
    x = torch.rand(6, 30, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    step = distillation(teacher, temperature=20.0)(_batch(student, x, y))
    soft = F.softmax(teacher(x) / 20.0, 1)
    assert torch.allclose(step.loss, -(soft * F.log_softmax(student(x) / 20.0, 1)).sum(1))


def test_a_student_that_equals_its_teacher_does_not_move():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    student.load_state_dict(teacher.state_dict())
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    fit(
        student,
        x,
        y,
        loss=distillation(advx.Classifier(teacher), temperature=50.0),
        schedule=Schedule(optimizer="sgd", lr=0.5),
        batch_size=32,
        progress=False,
    )
    for a, b in zip(student.parameters(), teacher.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fgsm_rs(0.0), "eps"),
        (lambda: fgsm_rs(-1), "eps"),
        (lambda: fgsm_rs(math.nan), "eps"),
        (lambda: fgsm_rs(0.3, alpha=0), "alpha"),
        (lambda: pgd_at(0.3, steps=0), "steps"),
        (lambda: pgd_at(0.3, step_size=-0.1), "step_size"),
        (lambda: pgd_at(0.3, warmup=-1), "warmup"),
        (lambda: fgsm_rs(0.3, warmup=1.5), "warmup"),
        (lambda: trades(0.3, beta=-1), "beta"),
        (lambda: trades(0.3, steps=1.5), "steps"),
        (lambda: standard(temperature=0), "temperature"),
        (lambda: distillation(object(), 10), "teacher"),
        (lambda: distillation(nn.Linear(2, 2), temperature=-3), "temperature"),
    ],
)
def test_bad_recipe_parameters_are_refused(make, match):
    with pytest.raises(InputError, match=match):
        make()


def test_an_eps_that_does_not_fit_the_bounds_is_refused_by_fit():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(InputError, match=r"eps must be in \(0, 1\)"):
        fit(
            net,
            torch.rand(8, 4),
            torch.zeros(8, dtype=torch.long),
            loss=fgsm_rs(1.5),
            progress=False,
        )
