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

from _common import (advx, cifar_balanced, machine, mnist_test, resnet20_normalized, table, trades_smallcnn,
                     versions, write_section)


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


def run_torchattacks(net, x, y, eps):
    import torchattacks

    counted = Counting(net).eval()
    atk = torchattacks.AutoAttack(counted, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
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
    return {"robust": r.robust_accuracy, "seconds": seconds, "fwd": r["totals"]["queries"],
            "bwd": r["totals"]["grads"], "report": r}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["trades", "resnet20"], default="trades")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-aa", type=int, default=200)
    ap.add_argument("--skip-standard-n", action="store_true", help="run `standard` on the n-aa points only")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    if args.model == "trades":
        net, (x, y), eps, what = trades_smallcnn(), mnist_test(args.n), 0.3, "TRADES SmallCNN, MNIST, Linf 0.3, first"
    else:
        net, (x, y), eps, what = resnet20_normalized(), cifar_balanced(args.n), 8 / 255, "ResNet-20 (undefended), CIFAR-10, Linf 8/255, class-balanced"
    advx.PGD(advx.Linf(eps), steps=1)(net, x[:200], y[:200])  # warm-up: chunk sizes measured once

    rows = []
    m = args.n_aa
    ta = run_torchattacks(net, x[:m], y[:m], eps)
    std_m = run_advx(net, x[:m], y[:m], eps, "standard")
    fast_m = run_advx(net, x[:m], y[:m], eps, "fast")
    rows.append(["torchattacks AutoAttack (standard)", m, f"{ta['robust']:.2%}", ta["seconds"], 1.0, ta["fwd"], ta["bwd"]])
    rows.append(["advx standard", m, f"{std_m['robust']:.2%}", std_m["seconds"], std_m["seconds"] / ta["seconds"], std_m["fwd"], std_m["bwd"]])
    rows.append(["advx fast", m, f"{fast_m['robust']:.2%}", fast_m["seconds"], fast_m["seconds"] / ta["seconds"], fast_m["fwd"], fast_m["bwd"]])
    if args.n > m:
        fast_n = run_advx(net, x, y, eps, "fast")
        if not args.skip_standard_n:
            std_n = run_advx(net, x, y, eps, "standard")
            rows.append(["advx standard", args.n, f"{std_n['robust']:.2%}", std_n["seconds"], None, std_n["fwd"], std_n["bwd"]])
        rows.append(["advx fast", args.n, f"{fast_n['robust']:.2%}", fast_n["seconds"],
                     fast_n["seconds"] / std_n["seconds"] if not args.skip_standard_n else None, fast_n["fwd"], fast_n["bwd"]])

    stages = []
    for name, res in (("standard", std_m), ("fast", fast_m)):
        for s in res["report"].cascade:
            stages.append([name, s["attack"], s["params"].get("loss", s["params"].get("targeted", "")), s["broke"],
                           f"{s['robust_accuracy_after']:.2%}", s["queries"], s["grads"], s["seconds"]])

    # the extras of a full audit, once: sanity checks and the eps curve
    t0 = time.perf_counter()
    full = advx.audit(net, x[:m], y[:m], advx.Linf(eps), suite="fast")
    extras = full["totals"]["seconds"]

    v = versions("torchattacks")
    text = "\n".join([
        f"## Audit suites vs AutoAttack: {args.model} (issue 3)",
        "",
        f"{what} {args.n} test images (AutoAttack on the first {m}). {machine()}. Versions: {v}.",
        "",
        f"Command: `python benchmarks/bench_audit.py --model {args.model} --n {args.n} --n-aa {m}"
        f"{' --skip-standard-n' if args.skip_standard_n else ''} --write`",
        "",
        table(["evaluation", "n", "robust accuracy", "seconds", "time ratio", "forward passes", "backward passes"],
              [[c if c is not None else "" for c in r] for r in rows]),
        "",
        "Time ratio: against torchattacks' AutoAttack on the same points (rows with n = n-aa), and `fast` against"
        " `standard` on all n points (last row).",
        "",
        f"`fast` against `standard` on the first {m}: {fast_m['seconds'] / std_m['seconds']:.2f}x the time, "
        f"{100 * (fast_m['robust'] - std_m['robust']):+.2f} points of robust accuracy"
        + (f"; on all {args.n}: {fast_n['seconds'] / std_n['seconds']:.2f}x the time, "
           f"{100 * (fast_n['robust'] - std_n['robust']):+.2f} points." if args.n > m and not args.skip_standard_n else "."),
        "",
        f"Per stage on the first {m} images:",
        "",
        table(["suite", "attack", "loss / targeted", "broke", "accuracy after", "forward", "backward", "seconds"], stages),
        "",
        f"A full `advx.audit(..., suite=\"fast\")` on the first {m} images with its sanity checks and eps curve: "
        f"{extras['total']:.1f} s in all ({extras['cascade']:.1f} s cascade, {extras['checks']:.1f} s checks, "
        f"{extras['eps_curve']:.1f} s eps curve); findings: {[f['code'] for f in full.findings] or 'none'}.",
    ])
    print(text)
    if args.write:
        write_section(f"audit-{args.model}", text)


if __name__ == "__main__":
    main()
