"""FAB-T (Linf): advx next to torchattacks on the TRADES SmallCNN (MNIST, eps 0.3).

    python benchmarks/bench_fab.py --n 100 --repeats 1

Both libraries attack the same points in the same process, one after the other; times are
medians and the ratio is advx / torchattacks. Robust accuracy is measured by one forward pass of
the plain model on each library's x_adv, counting only points within eps of the clean ones.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import advx, machine, median_time, mnist_test, table, trades_smallcnn, versions


def robust(net, x_adv, x, y, eps) -> float:
    with torch.no_grad():
        inside = (x_adv - x).flatten(1).abs().amax(dim=1) <= eps + 1e-5
        return float(((net(x_adv).argmax(1) == y) | ~inside).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import torchattacks

    net = trades_smallcnn()
    x, y = mnist_test(args.n)
    clf = advx.Classifier(net)
    eps = 0.3
    advx.PGD(advx.Linf(eps), steps=2)(clf, x, y)  # warm-up: advx measures its chunk sizes once

    ours = advx.attacks.create("fab", advx.Linf(eps), steps=args.steps, targets=9, targeted=True)
    theirs = torchattacks.FAB(
        net, norm="Linf", eps=eps, steps=args.steps, n_classes=10, multi_targeted=True, n_restarts=1
    )
    t_ours, t_theirs, r, xa = [], [], None, None
    for _ in range(args.repeats):  # interleaved, so that load drifts hit both alike
        t, _, xa = median_time(lambda: theirs(x, y), 1)
        t_theirs.append(t)
        t, _, r = median_time(lambda: ours(clf, x, y), 1)
        t_ours.append(t)
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    with torch.no_grad():
        clean = float((net(x).argmax(1) == y).float().mean())
    rows = [
        [
            "advx FAB-T",
            args.n,
            f"{clean:.0%}",
            f"{r.robust_accuracy:.0%}",
            f"{robust(net, r.x_adv, x, y, eps):.0%}",
            a,
            f"{r.grads.float().mean():.0f}",
            a / b,
        ],
        [
            "torchattacks FAB multi_targeted",
            args.n,
            f"{clean:.0%}",
            "-",
            f"{robust(net, xa, x, y, eps):.0%}",
            b,
            "-",
            1.0,
        ],
    ]
    print(
        table(
            [
                "attack",
                "n",
                "clean",
                "robust (reported)",
                "robust (re-checked)",
                "seconds",
                "backward passes / sample",
                "time ratio",
            ],
            rows,
        )
    )
    print()
    print(
        f"Linf eps {eps}, {args.steps} steps, 9 targets, 1 restart; {machine()}; "
        f"{versions('torchattacks')}"
    )


if __name__ == "__main__":
    main()
