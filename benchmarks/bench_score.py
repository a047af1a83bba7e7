r"""Score-based black-box attacks: advx ZOO and SimBA next to ART's ZooAttack (untargeted, L2).

    python benchmarks/bench_score.py --dataset mnist --n 100 --n-large 25
    python benchmarks/bench_score.py --dataset cifar --n 100 --n-large 25
    python benchmarks/bench_score.py --dataset cifar --n 50 --budgets 1000 \
        --zoo-resize 16,none --skip-simba

Models (undefended): MNIST -- advx's demo LeNet (``advx.zoo.build("lenet")``) trained here with
``advx.training.fit`` on the embedded ``mnist-demo`` train split (4 epochs, batch 64, lr 2e-3,
seed 0), attacked on the first ``n`` correctly classified images of the MNIST test set;
CIFAR-10 -- the ResNet-20 of ``_common.resnet20_normalized()`` on ``cifar_balanced(n)``, keeping
the correctly classified images.

Budgets are queries per sample (1,000 / 5,000 / 20,000 by default; the largest runs on the first
``--n-large`` images only, since ART needs minutes per image there). Every library attacks the
same points in the same process, one after the other; a query is one image through the net.

* advx ZOO: the defaults (128 coordinates, lr 0.1, c 1, 3 search steps, 8x8 attack space
  growing to the input's size, importance sampling) with ``max_queries`` = the budget; its
  count includes the clean check.
* ART ``ZooAttack``: its queries are counted by wrapping the net in a module that counts rows.
  One iteration costs 2 * nb_parallel + 1 queries per sample (the candidates and the new
  iterate), plus 2 per sample for the success check at the end of ``generate``; so
  ``max_iter = (budget - 2) // (2 * 128 + 1)`` with ``nb_parallel = 128`` (the paper's, ART's
  and advx's default) and ``binary_search_steps = 1`` (ART's default: more search steps leave
  too few iterations each at these budgets; a small grid on 8 images -- nb_parallel 16/64/128,
  1 or 3 search steps, c 1 or 10 -- found nothing better). ``abort_early=False`` so that it
  spends the budget it is given; the same lr, c and h as advx. ``batch_size=1``: ART's ZOO
  updates only the first image of a larger batch (its coordinate indices are taken modulo one
  image). ``use_resize=False``: ART's resizing starts at 32x32, no reduction at these sizes
  (and on 28x28 an increase); its importance sampling only acts above 32x32.
* advx SimBA (DCT and pixel bases, step 0.2) is not a minimum-norm attack: it runs in an L2
  ball (``--simba-eps``) large enough that it rarely binds, and stops at the first success.

Success rate is re-measured here with one plain forward pass on each x_adv. Median L2: over
each attack's own successes (not comparable between attacks of different success rates), over
all samples with a failure counted as infinite, and over the samples both ZOOs broke. Wall time
is one run (no repeats: the ART runs take minutes); torch runs one thread by default, since on
a shared machine more threads made small passes many times slower.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
from _common import (
    advx,
    build,
    cifar_balanced,
    load,
    machine,
    mnist_test,
    resnet20_normalized,
    table,
    versions,
)

BUDGETS = (1000, 5000, 20000)
ZOO_COORDS = 128


class Counting(torch.nn.Module):
    """Counts the rows of every forward pass (ART's queries)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.net(x)


def lenet_mnist(n: int):
    from advx.training import Schedule, fit

    x_train, y_train = load("mnist-demo", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build("lenet")
    fit(net, x_train, y_train, schedule=Schedule(epochs=4, lr=2e-3), batch_size=64, seed=0)
    net.eval()
    x, y = mnist_test(max(2 * n, 200))
    return net, *_correct(net, x, y, n)


def resnet_cifar(n: int):
    net = resnet20_normalized()
    x, y = cifar_balanced(n)
    return net, *_correct(net, x, y, n)


def _correct(net, x, y, n):
    with torch.no_grad():
        ok = net(x).argmax(1) == y
    return x[ok][:n].clone(), y[ok][:n].clone()


def measure(net, x, y, x_adv, seconds, queries) -> dict:
    """Success by one plain forward pass; L2 per sample with inf where the attack failed."""
    with torch.no_grad():
        success = net(x_adv).argmax(1) != y
    dist = (x_adv - x).flatten(1).norm(dim=1)
    return {
        "success": success,
        "dist": torch.where(success, dist, torch.full_like(dist, math.inf)),
        "queries": queries,
        "seconds": seconds,
    }


def _median(d: torch.Tensor) -> float:
    """The lower median (torch's), inf when fewer than half succeeded."""
    return float(d.median()) if d.numel() else math.nan


def cells(m: dict, common: torch.Tensor | None) -> list:
    ok = m["success"]
    return [
        f"{float(ok.float().mean()):.0%}",
        _median(m["dist"][ok]),
        _median(m["dist"]),
        "-" if common is None else _median(m["dist"][common]),
        m["queries"],
        m["seconds"],
    ]


def run_advx(attack, net, x, y) -> dict:
    box = advx.Classifier(net).as_blackbox("scores")
    t0 = time.perf_counter()
    r = attack(box, x, y)
    seconds = time.perf_counter() - t0
    return measure(net, x, y, r.x_adv, seconds, float(r.queries.float().mean()))


def run_art(net, x, y, budget, shape, lr, c, h):
    from art.attacks.evasion import ZooAttack
    from art.estimators.classification import PyTorchClassifier

    counter = Counting(net)
    clf = PyTorchClassifier(
        counter,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=shape,
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    max_iter = max(1, (budget - 2) // (2 * ZOO_COORDS + 1))
    attack = ZooAttack(
        clf,
        confidence=0.0,
        targeted=False,
        learning_rate=lr,
        max_iter=max_iter,
        binary_search_steps=1,
        initial_const=c,
        abort_early=False,
        use_resize=False,
        use_importance=True,
        nb_parallel=ZOO_COORDS,
        batch_size=1,
        variable_h=h,
        verbose=False,
    )
    np.random.seed(0)  # ART draws its coordinates from numpy's global generator
    t0 = time.perf_counter()
    x_adv = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy())).to(x.dtype)
    seconds = time.perf_counter() - t0
    return measure(net, x, y, x_adv, seconds, counter.rows / len(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=["mnist", "cifar"], default="mnist")
    ap.add_argument("--n", type=int, default=100, help="images at the smaller budgets")
    ap.add_argument("--n-large", type=int, default=25, help="images at budgets of 20,000 and more")
    ap.add_argument(
        "--budgets", type=lambda s: [int(v) for v in s.split(",")], default=list(BUDGETS)
    )
    ap.add_argument(
        "--simba-eps", type=float, default=None, help="L2 ball of SimBA (default: 3 MNIST, 1 CIFAR)"
    )
    ap.add_argument("--skip-art", action="store_true")
    ap.add_argument(
        "--zoo-resize",
        default="",
        help="extra advx ZOO rows with these first resolutions, e.g. 16,none",
    )
    ap.add_argument("--skip-simba", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (more threads on a shared machine can be much slower)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    net, x, y = lenet_mnist(args.n) if args.dataset == "mnist" else resnet_cifar(args.n)
    shape = tuple(x.shape[1:])
    simba_eps = args.simba_eps or (3.0 if args.dataset == "mnist" else 1.0)
    zoo = advx.attacks.ZOO(advx.L2(math.inf))
    # warm-up: advx measures its chunk sizes once per input shape
    advx.attacks.ZOO(advx.L2(math.inf), max_queries=1000)(
        advx.Classifier(net).as_blackbox("scores"), x[:2], y[:2]
    )

    header = [
        "data",
        "budget",
        "n",
        "attack",
        "success",
        "median L2 (successes)",
        "median L2 (all, failure = inf)",
        "median L2 (where both ZOOs succeed)",
        "queries/sample",
        "wall s",
    ]
    rows = []
    for budget in args.budgets:
        n = args.n if budget < 20000 else min(args.n, args.n_large)
        xb, yb = x[:n], y[:n]
        label = [args.dataset, f"{budget:,}", n]
        ours = run_advx(advx.attacks.ZOO(advx.L2(math.inf), max_queries=budget), net, xb, yb)
        theirs = (
            None if args.skip_art else run_art(net, xb, yb, budget, shape, zoo.lr, zoo.c, zoo.h)
        )
        common = None if theirs is None else ours["success"] & theirs["success"]
        block = [label + ["advx ZOO"] + cells(ours, common)]
        if theirs is not None:
            block.append(label + ["ART ZooAttack"] + cells(theirs, common))
        for extra in filter(None, args.zoo_resize.split(",")):
            size = None if extra == "none" else int(extra)
            other = run_advx(
                advx.attacks.ZOO(advx.L2(math.inf), max_queries=budget, resize=size), net, xb, yb
            )
            both = None if theirs is None else other["success"] & theirs["success"]
            block.append(label + [f"advx ZOO (resize={size})"] + cells(other, both))
        for basis in ("dct", "pixel") if not args.skip_simba else ():
            attack = advx.attacks.SimBA(advx.L2(simba_eps), basis=basis, max_queries=budget)
            block.append(
                label
                + [f"advx SimBA-{basis} (L2 <= {simba_eps:g})"]
                + cells(run_advx(attack, net, xb, yb), None)
            )
        print(table(header, block), flush=True)
        rows += block

    print()
    print(f"machine: {machine()}")
    print(f"versions: {versions('art')}")
    print()
    print(table(header, rows))


if __name__ == "__main__":
    main()
