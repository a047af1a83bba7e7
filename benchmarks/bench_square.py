"""Square Attack (Linf): advx next to torchattacks on the TRADES SmallCNN (MNIST, Linf 0.3).

    python benchmarks/bench_square.py --n 100 --queries 5000

Both libraries attack the same points in the same process, one after the other, with the same
number of search iterations (``queries``: one initial evaluation plus ``queries`` candidates per
sample in both). White-box APGD-CE on the same points is the reference the issue asks Square to
come within 0.5 points of. Robust accuracy is one forward pass of the plain model on each
x_adv. Queries of a success count every forward pass spent on that sample, the clean check
included (torchattacks' own count, which starts at its initial evaluation, plus one).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import advx, machine, mnist_test, table, trades_smallcnn, versions


def robust(net, x_adv, y) -> float:
    with torch.no_grad():
        return float((net(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)"
    )
    ap.add_argument("--apgd-steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import torchattacks

    net = trades_smallcnn()
    x, y = mnist_test(args.n)
    clf = advx.Classifier(net)
    eps, q = args.eps, args.queries
    rows = []
    with torch.no_grad():
        clean = float((net(x).argmax(1) == y).float().mean())

    # advx, as a score-only black box (it never asks for a gradient either way)
    advx.attacks.Square(advx.Linf(eps), queries=2)(clf, x[:4], y[:4])  # warm-up
    t0 = time.perf_counter()
    r = advx.attacks.Square(advx.Linf(eps), queries=q, p_init=0.8, loss="margin")(
        clf.as_blackbox("scores"), x, y
    )
    t_ours = time.perf_counter() - t0
    attacked = r.queries > 1  # clean-misclassified points cost one pass and are not attacked
    succ = r.success & attacked
    med_ours = float(r.queries[succ].float().median()) if bool(succ.any()) else float("nan")
    rows.append(
        [
            f"advx Square (queries={q})",
            f"{r.robust_accuracy:.2%}",
            f"{robust(net, r.x_adv, y):.2%}",
            int(succ.sum()),
            med_ours,
            int(r.queries.max()),
            t_ours,
        ]
    )

    # torchattacks: capture its per-sample query counts from the single run it makes
    ta = torchattacks.Square(
        net, norm="Linf", eps=eps, n_queries=q, n_restarts=1, p_init=0.8, loss="margin"
    )
    captured = {}
    single = ta.attack_single_run

    def spy(xs, ys):
        n_q, adv = single(xs, ys)
        captured["queries"], captured["adv"], captured["y"] = n_q, adv, ys
        return n_q, adv

    ta.attack_single_run = spy
    t0 = time.perf_counter()
    xa = ta(x, y)
    t_ta = time.perf_counter() - t0
    with torch.no_grad():
        fooled = net(captured["adv"]).argmax(1) != captured["y"]
    ta_q = captured["queries"][fooled] + 1  # + the clean check
    med_ta = float(ta_q.median()) if bool(fooled.any()) else float("nan")
    rows.append(
        [
            f"torchattacks Square (n_queries={q})",
            "-",
            f"{robust(net, xa, y):.2%}",
            int(fooled.sum()),
            med_ta,
            int(captured["queries"].max()) + 1,
            t_ta,
        ]
    )

    # white-box references
    t0 = time.perf_counter()
    xa = torchattacks.APGD(
        net, norm="Linf", eps=eps, steps=args.apgd_steps, n_restarts=1, loss="ce", seed=0
    )(x, y)
    rows.append(
        [
            f"torchattacks APGD-CE ({args.apgd_steps} steps, white-box)",
            "-",
            f"{robust(net, xa, y):.2%}",
            "-",
            "-",
            "-",
            time.perf_counter() - t0,
        ]
    )
    try:
        t0 = time.perf_counter()
        ra = advx.attacks.create("apgd", advx.Linf(eps), steps=args.apgd_steps)(clf, x, y)
        rows.append(
            [
                f"advx APGD ({args.apgd_steps} steps, white-box)",
                f"{ra.robust_accuracy:.2%}",
                f"{robust(net, ra.x_adv, y):.2%}",
                "-",
                "-",
                "-",
                time.perf_counter() - t0,
            ]
        )
    except Exception as e:
        rows.append(
            [f"advx APGD: not available ({type(e).__name__})", "-", "-", "-", "-", "-", "-"]
        )

    text = "\n".join(
        [
            "## Square Attack (Linf) vs torchattacks",
            "",
            f"TRADES SmallCNN, first {args.n} MNIST test images (clean accuracy {clean:.2%}),"
            f" Linf eps {eps}, {q} queries, p_init 0.8, margin loss, 1 restart. {machine()}."
            f" Versions: {versions('torchattacks')}.",
            "",
            f"Command: `python benchmarks/bench_square.py --n {args.n} --queries {q} --eps {eps}"
            f" --threads {args.threads}`",
            "",
            table(
                [
                    "attack",
                    "advx robust acc (reported)",
                    "robust acc (re-scored)",
                    "successes",
                    "median queries of successes",
                    "max queries per sample",
                    "seconds",
                ],
                rows,
            ),
        ]
    )
    print(text)


if __name__ == "__main__":
    main()
