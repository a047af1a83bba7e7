"""The audit's suites next to AutoAttack (torchattacks' implementation, version="standard").

    python benchmarks/bench_audit.py --model trades --n 1000 --n-aa 200 --write
    python benchmarks/bench_audit.py --model resnet20 --n 500 --n-aa 200 --write

All three run on the same points in one process: torchattacks' AutoAttack on the first n-aa
images, advx's `standard` and `fast` suites on the first n-aa and on the first n images. Only
the cascades are timed (the audit's sanity checks and eps curve are off here; their cost is
reported separately, once). Forward and backward passes are counted per sample by advx and, for
torchattacks, by a counting wrapper around the model.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import (
    advx,
    cifar_balanced,
    machine,
    mnist_test,
    resnet20_normalized,
    table,
    trades_smallcnn,
    versions,
    write_section,
)


class Counting(torch.nn.Module):
    """Counts the rows of forward and backward passes (for the peer, which counts nothing)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.fwd = 0
        self.bwd = 0

    def forward(self, x):
        self.fwd += x.shape[0]
        if x.requires_grad:
            x.register_hook(self._count)
        return self.net(x)

    def _count(self, g):
        self.bwd += g.shape[0]


def run_torchattacks(net, x, y, eps, steps: int | None = None):
    """torchattacks' AutoAttack(version="standard"). Its APGD, APGD-T and FAB-T run their own
    default of 10 steps there (fra31/auto-attack runs 100); ``steps`` builds the same cascade
    from torchattacks' attacks with that many steps instead, the paper's recipe."""
    import torchattacks

    counted = Counting(net).eval()
    if steps is None:
        atk = torchattacks.AutoAttack(
            counted, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0
        )
    else:
        kw = dict(eps=eps, norm="Linf", seed=0, n_restarts=1)
        atk = torchattacks.MultiAttack(
            [
                torchattacks.APGD(counted, loss="ce", steps=steps, **kw),
                torchattacks.APGDT(counted, n_classes=10, steps=steps, **kw),
                torchattacks.FAB(counted, multi_targeted=True, n_classes=10, steps=steps, **kw),
                torchattacks.Square(counted, n_queries=5000, **kw),
            ]
        )
    t0 = time.perf_counter()
    xa = atk(x, y)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((net(xa).argmax(1) == y).float().mean())
    return {"robust": acc, "seconds": seconds, "fwd": counted.fwd, "bwd": counted.bwd}


def run_advx(net, x, y, eps, suite, **classifier_kw):
    clf = advx.Classifier(net, **classifier_kw)
    t0 = time.perf_counter()
    r = advx.audit(clf, x, y, advx.Linf(eps), suite=suite, eps_curve=None, checks=False)
    seconds = time.perf_counter() - t0
    return {
        "robust": r.robust_accuracy,
        "seconds": seconds,
        "fwd": r.totals.queries,
        "bwd": r.totals.grads,
        "report": r,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["trades", "resnet20"], default="trades")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-aa", type=int, default=200)
    ap.add_argument(
        "--skip-standard-n", action="store_true", help="run `standard` on the n-aa points only"
    )
    ap.add_argument("--write", action="store_true")
    ap.add_argument(
        "--peer-steps",
        type=int,
        default=None,
        help="only run torchattacks' cascade with this many APGD/APGD-T/FAB-T steps"
        " (the paper's 100) on the first n-aa points and write it as its own section",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (one per process: the machines are shared)",
    )
    ap.add_argument(
        "--save", default=None, help="a folder for each advx report's JSON (per-sample results)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.model == "trades":
        net, (x, y), eps, what = (
            trades_smallcnn(),
            mnist_test(args.n),
            0.3,
            "TRADES SmallCNN, MNIST, Linf 0.3, first",
        )
    else:
        net, (x, y), eps, what = (
            resnet20_normalized(),
            cifar_balanced(args.n),
            8 / 255,
            "ResNet-20 (undefended), CIFAR-10, Linf 8/255, class-balanced",
        )
    advx.PGD(advx.Linf(eps), steps=1)(net, x[:200], y[:200])  # warm-up: chunk sizes measured once

    m = args.n_aa
    results: dict[str, dict] = {}

    def emit() -> None:
        """Write what has been measured so far: a killed run loses nothing already computed."""
        if args.save:
            import pathlib

            folder = pathlib.Path(args.save)
            folder.mkdir(parents=True, exist_ok=True)
            for key, r in results.items():
                if isinstance(r, dict) and "report" in r:
                    r["report"].save(folder / f"{args.model}-{key}.json")
        text = section(args, what, m, results)
        print(text, flush=True)
        if args.write:
            write_section(f"audit-{args.model}", text)

    if args.peer_steps:
        ta = run_torchattacks(net, x[:m], y[:m], eps, steps=args.peer_steps)
        text = "\n".join(
            [
                f"### torchattacks' AutoAttack cascade with {args.peer_steps} steps: {args.model}",
                "",
                f"{what} first {m} test images. torchattacks'"
                ' `AutoAttack(version="standard")` runs APGD, APGD-T and FAB-T with'
                " torchattacks' default of 10 steps; here the same cascade is built from"
                f" torchattacks' attacks with {args.peer_steps} steps each (fra31/auto-attack's"
                f" recipe), Square with 5,000 queries. {machine()}.",
                "",
                f"Command: `python benchmarks/bench_audit.py --model {args.model} --n-aa {m}"
                f" --peer-steps {args.peer_steps} --write`",
                "",
                table(
                    [
                        "evaluation",
                        "n",
                        "robust accuracy",
                        "seconds",
                        "forward passes",
                        "backward passes",
                    ],
                    [
                        [
                            f"torchattacks APGD-CE, APGD-T, FAB-T ({args.peer_steps} steps),"
                            " Square 5000",
                            m,
                            f"{ta['robust']:.2%}",
                            ta["seconds"],
                            ta["fwd"],
                            ta["bwd"],
                        ]
                    ],
                ),
            ]
        )
        print(text, flush=True)
        if args.write:
            write_section(f"audit-{args.model}-peer{args.peer_steps}", text)
        return
    results["ta"] = run_torchattacks(net, x[:m], y[:m], eps)
    emit()
    results["std_m"] = run_advx(net, x[:m], y[:m], eps, "standard")
    results["fast_m"] = run_advx(net, x[:m], y[:m], eps, "fast")
    # the extras of a full audit, once: sanity checks and the eps curve
    full = advx.audit(net, x[:m], y[:m], advx.Linf(eps), suite="fast")
    results["extras"] = {
        "totals": full.to_dict()["totals"]["seconds"],
        "findings": [f.code for f in full.findings],
    }
    emit()
    if args.n > m:
        results["fast_n"] = run_advx(net, x, y, eps, "fast")
        emit()
        if not args.skip_standard_n:
            results["std_n"] = run_advx(net, x, y, eps, "standard")
            emit()


def section(args, what: str, m: int, res: dict) -> str:
    ta, std_m, fast_m = res["ta"], res.get("std_m"), res.get("fast_m")
    rows = [
        [
            "torchattacks AutoAttack (standard)",
            m,
            f"{ta['robust']:.2%}",
            ta["seconds"],
            1.0,
            ta["fwd"],
            ta["bwd"],
        ]
    ]
    for label, key, n, ref in (
        ("advx standard", "std_m", m, "ta"),
        ("advx fast", "fast_m", m, "ta"),
        ("advx standard", "std_n", args.n, None),
        ("advx fast", "fast_n", args.n, "std_n"),
    ):
        r = res.get(key)
        if r is None:
            continue
        ratio = r["seconds"] / res[ref]["seconds"] if ref in res else None
        rows.append([label, n, f"{r['robust']:.2%}", r["seconds"], ratio, r["fwd"], r["bwd"]])
    v = versions("torchattacks")
    parts = [
        f"## Audit suites vs AutoAttack: {args.model} (issue 3)",
        "",
        f"{what} {args.n} test images (AutoAttack on the first {m}). {machine()}. Versions: {v}.",
        "",
        f"Command: `python benchmarks/bench_audit.py --model {args.model} --n {args.n} --n-aa {m}"
        f"{' --skip-standard-n' if args.skip_standard_n else ''} --write`",
        "",
        table(
            [
                "evaluation",
                "n",
                "robust accuracy",
                "seconds",
                "time ratio",
                "forward passes",
                "backward passes",
            ],
            [[c if c is not None else "" for c in r] for r in rows],
        ),
        "",
        "Time ratio: against torchattacks' AutoAttack on the same points (rows with n = n-aa),"
        " and `fast` against `standard` on all n points (last row).",
    ]
    if std_m and fast_m:
        line = (
            f"`fast` against `standard` on the first {m}: "
            f"{fast_m['seconds'] / std_m['seconds']:.2f}x the time, "
            f"{100 * (fast_m['robust'] - std_m['robust']):+.2f} points of robust accuracy"
        )
        if "std_n" in res and "fast_n" in res:
            line += (
                f"; on all {args.n}: "
                f"{res['fast_n']['seconds'] / res['std_n']['seconds']:.2f}x the time, "
                f"{100 * (res['fast_n']['robust'] - res['std_n']['robust']):+.2f} points"
            )
        stages = []
        for name, r in (("standard", std_m), ("fast", fast_m)):
            for s in r["report"].cascade:
                stages.append(
                    [
                        name,
                        s.attack,
                        s.params.get("loss", s.params.get("targeted", "")),
                        s.broke,
                        f"{s.robust_accuracy_after:.2%}",
                        s.queries,
                        s.grads,
                        s.seconds,
                    ]
                )
        e = res["extras"]["totals"]
        parts += [
            "",
            line + ".",
            "",
            f"Per stage on the first {m} images:",
            "",
            table(
                [
                    "suite",
                    "attack",
                    "loss / targeted",
                    "broke",
                    "accuracy after",
                    "forward",
                    "backward",
                    "seconds",
                ],
                stages,
            ),
            "",
            'A full `advx.audit(..., suite="fast")`'
            f" on the first {m} images with its sanity checks and eps curve:"
            f" {e['total']:.1f} s in all ({e['cascade']:.1f} s cascade,"
            f" {e['checks']:.1f} s checks,"
            f" {e['eps_curve']:.1f} s eps curve); findings: {res['extras']['findings'] or 'none'}.",
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
