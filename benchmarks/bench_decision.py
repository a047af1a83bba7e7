"""HopSkipJump and Boundary (label-only, untargeted, L2): advx next to foolbox 3 at equal query
budgets, on an undefended MNIST LeNet and on the CIFAR-10 ResNet-20.

    python benchmarks/bench_decision.py --n 100 --n-large 20 --cifar-n 20 --cifar-n-large 5

How the budgets are matched. advx counts queries per sample and stops each sample at
``max_queries`` (the clean check is not part of it); it runs once per budget. foolbox 3 has no
query budget: its attacks run a number of steps, every model call carries the whole batch
(one query per sample), and the number of calls per step varies (binary searches, step-size
searches). So foolbox runs once, with an unreachable number of steps, on a model wrapped to
count calls: at call B the wrapper notes, per sample, the closest adversarial input foolbox has
queried so far, and the time; at the largest budget it stops the attack. foolbox's own answer
after B calls is one of the inputs it queried, so this reading is at least as good for it as
setting ``steps`` to fit B. Both libraries attack the same correctly classified points, one
after the other in one process; foolbox draws from the global torch RNG, seeded to 0.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import advx, cifar_balanced, machine, mnist_test, resnet20_normalized, table, versions
from torch import nn


class _Spent(Exception):
    """The wrapped model has answered its last budgeted call."""


class Budgeted(nn.Module):
    """A peer's model that counts calls and reads the closest adversarial input queried so far
    at each budget; stops the attack at the largest one."""

    def __init__(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, budgets: list[int]
    ) -> None:
        super().__init__()
        self.net, self.x, self.y = net, x, y
        self.budgets = sorted(budgets)
        self.best = torch.full((len(x),), math.inf)
        self.calls = 0
        self.at: dict[int, tuple[torch.Tensor, float]] = {}
        self.start = time.perf_counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.x):
            raise RuntimeError(f"expected one row per sample ({len(self.x)}), got {x.shape[0]}")
        self.calls += 1
        logits = self.net(x)
        adv = logits.argmax(1) != self.y
        d = (x - self.x).flatten(1).norm(dim=1)  # (N, ...) -> (N,)
        self.best = torch.where(adv & (d < self.best), d, self.best)
        if self.calls in self.budgets:
            self.at[self.calls] = (self.best.clone(), time.perf_counter() - self.start)
            if self.calls == self.budgets[-1]:
                raise _Spent
        return logits


def foolbox_run(
    name: str, net: nn.Module, x, y, budgets: list[int]
) -> dict[int, tuple[torch.Tensor, float]]:
    import foolbox as fb

    wrapped = Budgeted(net, x, y, budgets).eval()
    fmodel = fb.PyTorchModel(wrapped, bounds=(0, 1))
    if name == "hopskipjump":
        attack = fb.attacks.HopSkipJumpAttack(steps=10**9)
    else:
        attack = fb.attacks.BoundaryAttack(steps=10**9)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            attack.run(fmodel, x, fb.criteria.Misclassification(y))
    except _Spent:
        pass
    return wrapped.at


def label_model(net: nn.Module, x: torch.Tensor):
    """advx's label-only view of ``net``, its chunk size tuned before any timing."""
    clf = advx.Classifier(net)
    clf(x[torch.arange(256) % len(x)])
    return clf.as_blackbox("labels")


def advx_run(name: str, model, x, y, budget: int) -> tuple[torch.Tensor, float]:
    attack = advx.attacks.create(name, advx.L2(math.inf), max_queries=budget)
    r = attack(model, x, y)
    assert int(r.queries.max()) <= budget + 1  # the clean check
    return torch.where(r.success, r.distance, torch.full_like(r.distance, math.inf)), r.seconds


def lenet_mnist(n: int):
    """The demo LeNet, trained for 4 epochs on the embedded MNIST slice; n correct test digits."""
    x, y = advx.data.load("mnist-demo", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.build("lenet")
    schedule = advx.training.Schedule(epochs=4, lr=2e-3)
    advx.training.fit(net, x, y, schedule=schedule, batch_size=64, seed=0)
    net.eval()
    xt, yt = mnist_test(max(4 * n, 500))
    return net, *_correct(net, xt, yt, n)


def resnet_cifar(n: int):
    net = resnet20_normalized()
    x, y = cifar_balanced(max(2 * n, 100))
    return net, *_correct(net, x, y, n)


def _correct(net, x, y, n):
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    return x[ok][:n].clone(), y[ok][:n].clone()


def median(d: torch.Tensor) -> float:
    return float(d.median())  # failures are inf: they count against the library


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument(
        "--large", type=int, default=20000, help="budgets from here on use the --*-large sizes"
    )
    ap.add_argument("--n", type=int, default=100, help="MNIST images")
    ap.add_argument("--n-large", type=int, default=20, help="MNIST images at the large budgets")
    ap.add_argument("--cifar-n", type=int, default=20)
    ap.add_argument("--cifar-n-large", type=int, default=5)
    ap.add_argument("--attacks", nargs="+", default=["hopskipjump", "boundary"])
    ap.add_argument("--models", nargs="+", default=["mnist", "cifar"])
    args = ap.parse_args()

    rows = []
    for model in args.models:
        sizes = (args.n, args.n_large) if model == "mnist" else (args.cifar_n, args.cifar_n_large)
        net, x, y = lenet_mnist(sizes[0]) if model == "mnist" else resnet_cifar(sizes[0])
        groups = [
            (sizes[0], [b for b in args.budgets if b < args.large]),
            (sizes[1], [b for b in args.budgets if b >= args.large]),
        ]
        for attack in args.attacks:
            for n, budgets in groups:
                if not budgets or n == 0:
                    continue
                xs, ys = x[:n], y[:n]
                theirs = foolbox_run(attack, net, xs, ys, budgets)
                box = label_model(net, xs)
                for b in budgets:
                    d_ours, t_ours = advx_run(attack, box, xs, ys, b)
                    d_theirs, t_theirs = theirs[b]
                    rows.append(
                        [
                            model,
                            attack,
                            b,
                            n,
                            median(d_ours),
                            median(d_theirs),
                            f"{float(torch.isfinite(d_ours).float().mean()):.0%}",
                            f"{float(torch.isfinite(d_theirs).float().mean()):.0%}",
                            t_ours,
                            t_theirs,
                        ]
                    )
                    print(table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"{machine()}; {versions('foolbox')}")
    print()
    print(table(HEADER, rows))


HEADER = [
    "model",
    "attack",
    "queries/sample",
    "images",
    "median L2 advx",
    "median L2 foolbox",
    "success advx",
    "success foolbox",
    "time advx (s)",
    "time foolbox (s)",
]

if __name__ == "__main__":
    main()
