"""FGSM, PGD and CW-L2: advx next to torchattacks.

    python benchmarks/bench_whitebox.py --n 1000 --n-cw 200 --repeats 3 --write

FGSM and PGD on the TRADES SmallCNN (MNIST, Linf 0.3). CW-L2 on undefended points, as the issue
asks: a LeNet trained here for two epochs on the full MNIST training set with plain
cross-entropy (seeded; about a minute), attacked on the first --n-cw test images. Both libraries
attack the same points in the same process, one after the other, repeatedly; times are medians
and the ratio is advx / torchattacks. Robust accuracy is measured by one forward pass of the
plain model on each library's x_adv.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from _common import (
    SHARED,
    advx,
    load,
    machine,
    median_time,
    mnist_test,
    table,
    trades_smallcnn,
    versions,
    write_section,
)


def robust(net, x_adv, y) -> float:
    with torch.no_grad():
        return float((net(x_adv).argmax(1) == y).float().mean())


def pgd_section(args, pair, clf, net, x, y, eps) -> str:
    """PGD-40 (step 0.01, random start) against torchattacks on the TRADES SmallCNN and on a
    LeNet5 trained here on the embedded MNIST slice (bench_proxies.trained_lenet5)."""
    import os

    import torchattacks
    from bench_proxies import trained_lenet5

    lenet = trained_lenet5()
    rows = []
    for model_name, m in (("TRADES SmallCNN", net), ("LeNet5 (32-64 conv, 200 hidden)", lenet)):
        c = advx.Classifier(m)
        advx.PGD(advx.Linf(eps), steps=2)(c, x, y)  # warm-up: the chunk tuner
        for early in (True, False):
            t_a, t_t, r, xa = pair(
                "pgd",
                lambda c=c, early=early: advx.PGD(
                    advx.Linf(eps), steps=40, step_size=0.01, early_stop=early
                )(c, x, y),
                lambda m=m: torchattacks.PGD(m, eps=eps, alpha=0.01, steps=40, random_start=True)(
                    x, y
                ),
                args.repeats,
            )
            rows.append(
                [
                    model_name,
                    f"early_stop={early}",
                    f"{r.robust_accuracy:.2%}",
                    f"{robust(m, xa, y):.2%}",
                    t_a,
                    t_t,
                    t_a / t_t,
                ]
            )
    load = os.getloadavg()
    return "\n".join(
        [
            f"## PGD-40 vs torchattacks on two MNIST architectures (issue 15) {args.label}",
            "",
            f"First {args.n} MNIST test images, Linf eps {eps}, step 0.01, random start; "
            f"{machine()}; load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; "
            f"versions {versions('torchattacks')}. Interleaved repeats, medians.",
            "",
            f"Command: `python benchmarks/bench_whitebox.py --only pgd --n {args.n} "
            f"--repeats {args.repeats} --label {args.label} --write`",
            "",
            table(
                [
                    "model",
                    "advx",
                    "advx robust acc",
                    "torchattacks robust acc",
                    "advx s (median)",
                    "torchattacks s (median)",
                    "ratio advx/ta",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-cw", type=int, default=200)
    ap.add_argument("--cw-steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    ap.add_argument(
        "--only",
        choices=["all", "cw", "pgd"],
        default="all",
        help="cw: the CW section alone; pgd: PGD-40 on the SmallCNN and a LeNet5 (issue 15)",
    )
    ap.add_argument("--label", default="", help="pgd: a label for the section (e.g. before)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread per job: these machines are shared

    import torchattacks

    net = trades_smallcnn()
    x, y = mnist_test(args.n)
    clf = advx.Classifier(net)
    eps = 0.3
    rows = []

    # warm-up: advx measures its chunk sizes once per input shape, torchattacks has no state
    advx.PGD(advx.Linf(eps), steps=2)(clf, x[:200], y[:200])

    def pair(label, ours, theirs, repeats):
        times_ours, r_ours = [], None
        times_theirs, r_theirs = [], None
        for _ in range(repeats):  # interleaved, so that load drifts hit both alike
            m, ts, r_theirs = median_time(theirs, 1)
            times_theirs += ts
            m, ts, r_ours = median_time(ours, 1)
            times_ours += ts
        return statistics.median(times_ours), statistics.median(times_theirs), r_ours, r_theirs

    if args.only == "pgd":
        text = pgd_section(args, pair, clf, net, x, y, eps)
        print(text)
        if args.write:
            write_section(f"whitebox-pgd-lenet {args.label}".strip(), text)
        return

    if args.only == "cw":
        text = cw_section(args)
        print(text)
        if args.write:
            write_section("whitebox-cw", text)
        return

    # FGSM
    t_a, t_t, r, xa = pair(
        "fgsm",
        lambda: advx.FGSM(advx.Linf(eps))(clf, x, y),
        lambda: torchattacks.FGSM(net, eps=eps)(x, y),
        args.repeats,
    )
    rows.append(
        [
            "FGSM",
            args.n,
            f"{r.robust_accuracy:.2%}",
            f"{robust(net, xa, y):.2%}",
            t_a,
            t_t,
            t_a / t_t,
        ]
    )

    # PGD, 40 steps of 0.01 from a random start
    for early in (True, False):
        t_a, t_t, r, xa = pair(
            "pgd",
            lambda early=early: advx.PGD(
                advx.Linf(eps), steps=40, step_size=0.01, early_stop=early
            )(clf, x, y),
            lambda: torchattacks.PGD(net, eps=eps, alpha=0.01, steps=40, random_start=True)(x, y),
            args.repeats,
        )
        rows.append(
            [
                f"PGD-40 (early_stop={early})",
                args.n,
                f"{r.robust_accuracy:.2%}",
                f"{robust(net, xa, y):.2%}",
                t_a,
                t_t,
                t_a / t_t,
            ]
        )

    v = versions("torchattacks")
    text = "\n".join(
        [
            "## White-box: FGSM, PGD, CW-L2 vs torchattacks (issue 2)",
            "",
            "TRADES SmallCNN (`../shared/models/trades_mnist_smallcnn.pt`),"
            f" first {args.n} MNIST test images, Linf eps {eps}. {machine()}. Versions: {v}.",
            "",
            f"Command: `python benchmarks/bench_whitebox.py --n {args.n} --n-cw {args.n_cw}"
            f" --cw-steps {args.cw_steps} --repeats {args.repeats} --write`",
            "",
            table(
                [
                    "attack",
                    "n",
                    "advx robust acc",
                    "torchattacks robust acc",
                    "advx s (median)",
                    "torchattacks s (median)",
                    "ratio advx/ta",
                ],
                rows,
            ),
        ]
    )
    print(text)
    if args.write:
        write_section("whitebox", text)
    text = cw_section(args)
    print(text)
    if args.write:
        write_section("whitebox-cw", text)


def undefended_lenet() -> torch.nn.Module:
    from advx.training import Schedule, fit

    x, y = load(SHARED / "data" / "mnist", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.build("lenet")
    schedule = Schedule(epochs=2, lr=2e-3)
    fit(net, x, y, schedule=schedule, batch_size=128, seed=0, progress=False, monitor=None)
    return net.eval()


def cw_section(args) -> str:
    import torchattacks

    net = undefended_lenet()
    clf = advx.Classifier(net)
    xc, yc = mnist_test(args.n_cw)
    with torch.no_grad():
        correct = net(xc).argmax(1) == yc
    xc, yc = xc[correct], yc[correct]
    search = 10
    cw_rows = []
    theirs = {}
    for lr in (0.01, 0.05):  # torchattacks' default lr is 0.01; both libraries at both rates
        t, _, xt = median_time(
            lambda lr=lr: torchattacks.CW(net, c=1, kappa=0, steps=args.cw_steps, lr=lr)(xc, yc),
            1,
        )
        with torch.no_grad():
            ok = net(xt).argmax(1) != yc
        theirs[lr] = (t, ok, (xt - xc).flatten(1).norm(dim=1))
    t_ref = theirs[0.01][0]

    def medians(ok, l2, other_ok):
        inf = torch.full_like(l2, math.inf)
        both = ok & other_ok
        return [
            float(l2[ok].median()) if bool(ok.any()) else math.nan,
            float(l2[both].median()) if bool(both.any()) else math.nan,
            float(torch.where(ok, l2, inf).median()),
        ]

    ours = {}
    for lr in (0.01, 0.05):
        attack = advx.CW(steps=args.cw_steps // search, search_steps=search, initial_c=1.0, lr=lr)
        t_a, _, r = median_time(lambda attack=attack: attack(clf, xc, yc), 1)
        ours[lr] = (t_a, r.success.cpu(), r.distance.cpu())
    for lr, (t, ok, l2) in ours.items():
        cw_rows.append(
            [
                f"advx CW {search}x{args.cw_steps // search} (initial_c=1, lr={lr})",
                len(xc),
                f"{float(ok.float().mean()):.1%}",
                *medians(ok, l2, theirs[lr][1]),
                t,
                t / t_ref,
            ]
        )
    for lr, (t, ok, l2) in theirs.items():
        cw_rows.append(
            [
                f"torchattacks CW c=1, {args.cw_steps} steps, lr={lr}",
                len(xc),
                f"{float(ok.float().mean()):.1%}",
                *medians(ok, l2, ours[lr][1]),
                t,
                t / t_ref,
            ]
        )

    v = versions("torchattacks")
    return "\n".join(
        [
            "## White-box: CW-L2 vs torchattacks on undefended points (issue 2)",
            "",
            "An undefended LeNet (2 epochs of cross-entropy on the full MNIST training set,"
            f" seed 0), the first {args.n_cw} MNIST test images (the {len(xc)} it classifies"
            " correctly), minimum-norm CW-L2 with the same total number of optimization steps"
            f" ({args.cw_steps}); advx searches c per sample, torchattacks uses one c."
            f" {machine()}. Versions: {v}.",
            "",
            f"Command: `python benchmarks/bench_whitebox.py --n-cw {args.n_cw}"
            f" --cw-steps {args.cw_steps} --only cw --write`",
            "",
            table(
                [
                    "attack",
                    "n",
                    "success",
                    "median L2 (successes)",
                    "median L2 (where both at this lr succeed)",
                    "median L2 (all, failure = inf)",
                    "seconds",
                    "time ratio vs ta lr=0.01",
                ],
                cw_rows,
            ),
            "",
            "torchattacks' CW stops early when its summed loss rises between two of ten"
            " checkpoints, so its time depends on the lr; advx's CW runs its 10 searches of c"
            " per sample (early abort per sample within a search).",
        ]
    )


if __name__ == "__main__":
    main()
