"""FGSM, PGD and CW-L2: advx next to torchattacks on the TRADES SmallCNN (MNIST, Linf 0.3).

    python benchmarks/bench_whitebox.py --n 1000 --n-cw 200 --repeats 3 --write

Both libraries attack the same points in the same process, one after the other, repeatedly;
times are medians and the ratio is advx / torchattacks. Robust accuracy is measured by one
forward pass of the plain model on each library's x_adv.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import (advx, machine, median_time, mnist_test, table, trades_smallcnn, versions,
                     write_section)


def robust(net, x_adv, y) -> float:
    with torch.no_grad():
        return float((net(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-cw", type=int, default=200)
    ap.add_argument("--cw-steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = ap.parse_args()

    import torchattacks

    net = trades_smallcnn()
    x, y = mnist_test(args.n)
    clf = advx.Classifier(net)
    eps = 0.3
    rows = []

    # warm-up: advx measures its chunk sizes once per input shape, torchattacks has no state
    advx.PGD(advx.Linf(eps), steps=2)(clf, x[:200], y[:200])

    def pair(label, ours, theirs, repeats):
        t_ours, times_ours, r_ours = [], [], None
        t_theirs, times_theirs, r_theirs = [], [], None
        for _ in range(repeats):  # interleaved, so that load drifts hit both alike
            m, ts, r_theirs = median_time(theirs, 1)
            times_theirs += ts
            m, ts, r_ours = median_time(ours, 1)
            times_ours += ts
        return statistics.median(times_ours), statistics.median(times_theirs), r_ours, r_theirs

    # FGSM
    t_a, t_t, r, xa = pair(
        "fgsm",
        lambda: advx.FGSM(advx.Linf(eps))(clf, x, y),
        lambda: torchattacks.FGSM(net, eps=eps)(x, y),
        args.repeats,
    )
    rows.append(["FGSM", args.n, f"{r.robust_accuracy:.2%}", f"{robust(net, xa, y):.2%}", t_a, t_t, t_a / t_t])

    # PGD, 40 steps of 0.01 from a random start
    for early in (True, False):
        t_a, t_t, r, xa = pair(
            "pgd",
            lambda: advx.PGD(advx.Linf(eps), steps=40, step_size=0.01, early_stop=early)(clf, x, y),
            lambda: torchattacks.PGD(net, eps=eps, alpha=0.01, steps=40, random_start=True)(x, y),
            args.repeats,
        )
        rows.append([f"PGD-40 (early_stop={early})", args.n, f"{r.robust_accuracy:.2%}",
                     f"{robust(net, xa, y):.2%}", t_a, t_t, t_a / t_t])

    # CW-L2 on the first n-cw points: the same total number of optimization steps
    xc, yc = x[: args.n_cw], y[: args.n_cw]
    with torch.no_grad():
        correct = net(xc).argmax(1) == yc
    xc, yc = xc[correct], yc[correct]
    search = 10
    cw_rows = []
    t_t, _, xt = median_time(lambda: torchattacks.CW(net, c=1, kappa=0, steps=args.cw_steps, lr=0.01)(xc, yc), 1)
    with torch.no_grad():
        ok_t = net(xt).argmax(1) != yc
    l2_t = (xt - xc).flatten(1).norm(dim=1)
    for label, attack in (
        (f"advx CW {search}x{args.cw_steps // search} (initial_c=1)",
         advx.CW(steps=args.cw_steps // search, search_steps=search, initial_c=1.0, lr=0.01)),
        (f"advx CW {search}x{args.cw_steps // search} (initial_c=1, lr=0.05)",
         advx.CW(steps=args.cw_steps // search, search_steps=search, initial_c=1.0, lr=0.05)),
    ):
        t_a, _, r = median_time(lambda: attack(clf, xc, yc), 1)
        cw_rows.append([label, len(xc), f"{r.success_rate:.1%}", float(r.distance[r.success].median()),
                        t_a, t_a / t_t])
    cw_rows.append([f"torchattacks CW c=1, {args.cw_steps} steps", len(xc), f"{float(ok_t.float().mean()):.1%}",
                    float(l2_t[ok_t].median()) if bool(ok_t.any()) else float("nan"), t_t, 1.0])

    v = versions("torchattacks")
    text = "\n".join([
        "## White-box: FGSM, PGD, CW-L2 vs torchattacks (issue 2)",
        "",
        f"TRADES SmallCNN (`../shared/models/trades_mnist_smallcnn.pt`), first {args.n} MNIST test images,"
        f" Linf eps {eps}. {machine()}. Versions: {v}.",
        "",
        f"Command: `python benchmarks/bench_whitebox.py --n {args.n} --n-cw {args.n_cw} --cw-steps {args.cw_steps} "
        f"--repeats {args.repeats} --write`",
        "",
        table(["attack", "n", "advx robust acc", "torchattacks robust acc", "advx s (median)",
               "torchattacks s (median)", "ratio advx/ta"], rows),
        "",
        f"CW-L2, minimum norm, first {args.n_cw} images (the {len(xc)} correctly classified), the same total"
        f" number of optimization steps ({args.cw_steps}); advx searches c per sample, torchattacks uses one c:",
        "",
        table(["attack", "n", "success", "median L2 (successes)", "seconds", "time ratio vs ta"], cw_rows),
    ])
    print(text)
    if args.write:
        write_section("whitebox", text)


if __name__ == "__main__":
    main()
