"""APGD-CE and APGD-T: advx next to torchattacks on the TRADES SmallCNN (MNIST, Linf 0.3).

    python benchmarks/bench_apgd.py --n 200 --steps 100

Both libraries attack the same points in the same process, one after the other; robust accuracy
is measured by one forward pass of the plain model on each library's x_adv (and, for advx, also
as reported). Times: wall-clock seconds of one run (the median when --repeats > 1) and the
process's CPU seconds per run (the fairer figure on a shared machine; use --threads 1).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import advx, machine, median_time, mnist_test, table, trades_smallcnn, versions


def robust(net, x_adv, y) -> float:
    with torch.no_grad():
        return float((net(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated: APGD-CE,APGD-DLR,APGD-T")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torchattacks

    from advx.attacks import APGD

    net = trades_smallcnn()
    x, y = mnist_test(args.n)
    clf = advx.Classifier(net)
    eps, steps = 0.3, args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    APGD(advx.Linf(eps), steps=2)(
        clf, x, y
    )  # warm-up: advx measures its chunk sizes once per shape

    only = set(args.only.split(",")) if args.only else None
    runs = [
        ("APGD-CE", "advx", lambda: APGD(advx.Linf(eps), loss="ce", steps=steps)(clf, x, y)),
        (
            "APGD-CE",
            "torchattacks",
            lambda: torchattacks.APGD(
                net, norm="Linf", eps=eps, steps=steps, loss="ce", n_restarts=1
            )(x, y),
        ),
        ("APGD-DLR", "advx", lambda: APGD(advx.Linf(eps), loss="dlr", steps=steps)(clf, x, y)),
        (
            "APGD-DLR",
            "torchattacks",
            lambda: torchattacks.APGD(
                net, norm="Linf", eps=eps, steps=steps, loss="dlr", n_restarts=1
            )(x, y),
        ),
        (
            "APGD-T (9 targets)",
            "advx",
            lambda: APGD(advx.Linf(eps), loss="dlr-targeted", steps=steps, targets=9)(clf, x, y),
        ),
        (
            "APGD-T (9 targets)",
            "torchattacks",
            lambda: torchattacks.APGDT(
                net, norm="Linf", eps=eps, steps=steps, n_restarts=1, n_classes=10
            )(x, y),
        ),
    ]
    rows = []
    with torch.no_grad():
        clean = float((net(x).argmax(1) == y).float().mean())
    for attack, lib, fn in runs:
        if only and attack.split(" ")[0] not in only:
            continue
        cpu0 = time.process_time()
        seconds, _, out = median_time(fn, args.repeats)
        cpu = (time.process_time() - cpu0) / args.repeats
        if lib == "advx":
            x_adv = out.x_adv
            extra = (
                f"{out.robust_accuracy:.2%} reported, "
                f"{float(out.grads.float().mean()):.1f} grads/sample"
            )
        else:
            x_adv, extra = out, ""
        inside = float((x_adv - x).abs().amax() <= eps + 1e-6)
        rows.append(
            [
                attack,
                lib,
                f"{robust(net, x_adv, y):.2%}",
                extra,
                seconds,
                cpu,
                "yes" if inside else "NO",
            ]
        )
        print(" | ".join(map(str, rows[-1])), flush=True)  # progress: the table comes at the end

    text = "\n".join(
        [
            f"## APGD vs torchattacks: TRADES SmallCNN, first {args.n} MNIST test images, "
            f"Linf {eps}, {steps} steps, 1 restart",
            "",
            f"Clean accuracy {clean:.2%}. {machine()}. Versions: {versions('torchattacks')}.",
            "",
            f"Command: `python benchmarks/bench_apgd.py --n {args.n} --steps {steps}"
            f" --repeats {args.repeats}"
            f"{' --threads ' + str(args.threads) if args.threads else ''}"
            f"{' --only ' + args.only if args.only else ''}`",
            "",
            table(
                [
                    "attack",
                    "library",
                    "robust acc (plain forward)",
                    "advx",
                    "wall s",
                    "CPU s",
                    "inside ball",
                ],
                rows,
            ),
        ]
    )
    print(text)


if __name__ == "__main__":
    main()
