"""The guard's detection and calibration: a calibrated Guard against PGD, CW and Square, then
against attacks that know its detectors; and whether the calibrated guarantees hold on held-out
data.

    python benchmarks/bench_guard_detect.py --n 200 --write

Two models: the LeNet of ``advx demo`` (trained as the demo trains it: mnist-demo train split,
4 epochs, batch 64, lr 2e-3, seed 0) on the embedded test digits, and the TRADES SmallCNN of
``../shared/models`` on the real MNIST test set of ``../shared/data``.

The guard: feature squeezing (bits:1, median:2) + the energy OOD score + the confidence floor,
calibrated with ``guard.calibrate(x_cal, y_cal, fpr=0.05)`` on clean test images so that the
union of the three rules flags 5% of clean inputs. Attacks run on ``n`` correctly classified
held-out images (never used for calibration). "Stopped" = the guard does not accept the
adversarial example (abstain, review or reject); "evaded" = accepted with a wrong label, which
is what an attacker needs.

Adaptive: the attacker knows the detectors and thresholds. ``guard.as_detector()`` is the whole
policy as one detector (fires when any rule fires); ``DetectorAware`` adds it as an 11th logit,
and a targeted attack towards each point's most likely other class must win without that logit
winning (Carlini & Wagner 2017), with BPDA through the squeezers.

Calibration: a second calibration with a selective-risk target (``risk``, ``delta``); the
measured false-positive rate and selective risk on a disjoint held-out split vs the stated
guarantees and their intervals.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import (
    advx,
    machine,
    mnist_test,
    table,
    trades_smallcnn,
    versions,
    write_section,
)

from advx.defenses import DetectorAware
from advx.guard import Guard, build_detectors
from advx.guard._binom import clopper_pearson

DETECTORS = "feature_squeezing,energy"


def train_lenet() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.build("lenet")
    x, y = advx.data.load("mnist-demo", split="train")
    advx.training.fit(net, x, y, epochs=4, batch_size=64, lr=2e-3, seed=0, progress=False)
    return net.eval()


def outcome(guard: Guard, x_adv: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
    """(share of the model's misclassified examples the guard stops, share of all points that
    evade the guard: accepted with a wrong label, number misclassified)."""
    d = guard(x_adv)
    pred = torch.tensor([dec.predicted for dec in d])
    wrong = pred != y
    stopped = torch.tensor([not dec.accepted for dec in d])
    evaded = ~stopped & wrong
    n_wrong = int(wrong.sum())
    caught = float(stopped[wrong].float().mean()) if n_wrong else float("nan")
    return caught, float(evaded.float().mean()), n_wrong


def detection(name, clf, x_cal, y_cal, x_held, y_held, args) -> tuple[list, str]:
    guard = Guard(clf, detectors=build_detectors(DETECTORS, clf))
    rep = guard.calibrate(x_cal, y_cal, fpr=args.fpr)
    held = guard(x_held)
    fpr_held = 1 - held.count("accept") / len(held)
    k = len(held) - held.count("accept")
    lo, hi = rep.fpr["interval"]
    with torch.no_grad():
        correct = clf.predict(x_held) == y_held
    x, y = x_held[correct][: args.n], y_held[correct][: args.n]
    eps = args.eps
    attacks = [
        (f"PGD (Linf {eps:g}, 40 steps)", advx.PGD(advx.Linf(eps), steps=40, seed=0)),
        (
            f"CW (L2, min-norm, {args.cw_search}x{args.cw_steps} steps)",
            advx.CW(steps=args.cw_steps, search_steps=args.cw_search, initial_c=1.0, lr=0.05),
        ),
        (
            f"Square (Linf {eps:g}, {args.queries} queries)",
            advx.attacks.create("square", advx.Linf(eps), queries=args.queries, seed=0),
        ),
    ]
    rows = []
    for label, attack in attacks:
        t0 = time.perf_counter()
        r = attack(clf, x, y)
        secs = time.perf_counter() - t0
        caught, evaded, n_wrong = outcome(guard, r.x_adv, y)
        rows.append(
            [
                name,
                label,
                "no",
                f"{n_wrong}/{len(y)}",
                f"{caught:.1%}",
                f"{evaded:.1%}",
                f"{secs:.0f}",
            ]
        )
        print(rows[-1], flush=True)

    x, y = x[: args.n_adaptive], y[: args.n_adaptive]  # the adaptive attacks cost far more
    with torch.no_grad():
        target = clf(x).scatter(1, y.view(-1, 1), float("-inf")).argmax(1)
    aware = DetectorAware(clf, guard.as_detector(), scale=args.scale)
    adaptive = [
        (
            f"PGD on DetectorAware (targeted, Linf {eps:g}, {args.adaptive_steps} steps, BPDA)",
            advx.PGD(advx.Linf(eps), steps=args.adaptive_steps, seed=0),
        ),
        (
            f"CW on DetectorAware (targeted, L2 min-norm, {args.cw_search}x{args.cw_steps}, BPDA)",
            advx.CW(steps=args.cw_steps, search_steps=args.cw_search, initial_c=1.0, lr=0.05),
        ),
        (
            f"PGD on DetectorAware (targeted, L2 {args.eps_l2:g}, {args.adaptive_steps} steps, "
            "BPDA)",
            advx.PGD(advx.L2(args.eps_l2), steps=args.adaptive_steps, seed=0),
        ),
        (
            f"Square on DetectorAware (targeted, Linf {eps:g}, {args.queries} queries)",
            advx.attacks.create("square", advx.Linf(eps), queries=args.queries, seed=0),
        ),
    ]
    for label, attack in adaptive:
        t0 = time.perf_counter()
        r = attack(aware, x, y, target=target)
        secs = time.perf_counter() - t0
        caught, evaded, n_wrong = outcome(guard, r.x_adv, y)
        rows.append(
            [
                name,
                label,
                "yes",
                f"{n_wrong}/{len(y)}",
                f"{caught:.1%}",
                f"{evaded:.1%}",
                f"{secs:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    note = (
        f"{name}: clean accuracy on held-out {float(correct.float().mean()):.1%}; guard calibrated "
        f"on {len(y_cal)} clean images (policy {guard.policy.hash}): thresholds "
        + ", ".join(f"{k} > {v:.4g}" for k, v in sorted(rep.thresholds.items()))
        + f", confidence < {rep.min_confidence:.4g}; stated FPR {rep.fpr['measured']:.1%} "
        f"({rep.fpr['flagged']}/{rep.fpr['n']}), 95% interval [{lo:.1%}, {hi:.1%}]; measured on "
        f"{len(held)} held-out clean images: {fpr_held:.1%} ({k}/{len(held)}); {len(y)} attacked "
        "points"
    )
    return rows, note


def calibration(name, clf, x_cal, y_cal, x_held, y_held, risk, delta, fpr) -> list:
    guard = Guard(clf, detectors=build_detectors(DETECTORS, clf))
    rep = guard.calibrate(x_cal, y_cal, fpr=fpr, risk=risk, delta=delta)
    held = guard(x_held)
    flagged = sum(d.action in ("review", "reject") for d in held)  # the detector rules
    acc = [(d.label, int(t)) for d, t in zip(held, y_held.tolist()) if d.accepted]
    errors = sum(a != b for a, b in acc)
    r = rep.selective_risk
    lo, hi = rep.fpr["interval"]
    r_lo, r_hi = clopper_pearson(errors, len(acc), 0.95)
    with torch.no_grad():
        plain = float((clf.predict(x_held) != y_held).float().mean())
    return [
        name,
        f"{len(y_cal)} / {len(y_held)}",
        f"{fpr:g}: {rep.fpr['measured']:.2%} [{lo:.2%}, {hi:.2%}]",
        f"{flagged / len(held):.2%} ({flagged}/{len(held)})",
        f"<= {risk:g} w.p. {1 - delta:g} (upper bound {r['upper_bound']:.2%}; "
        f"floor {r['floor']:.4f})",
        f"{errors / max(1, len(acc)):.2%} ({errors}/{len(acc)}) [{r_lo:.2%}, {r_hi:.2%}]",
        f"{plain:.2%}",
        f"{r['coverage']:.1%}",
        f"{len(acc) / len(held):.1%}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="attacked points per model")
    ap.add_argument("--n-adaptive", type=int, default=50, help="of them, attacked adaptively")
    ap.add_argument("--eps-l2", type=float, default=2.0, help="L2 budget of the adaptive PGD")
    ap.add_argument("--model", choices=["lenet", "trades"], default=None, help="only this one")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--cw-steps", type=int, default=50)
    ap.add_argument("--cw-search", type=int, default=5)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--adaptive-steps", type=int, default=100)
    ap.add_argument("--scale", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["detect", "calibrate"], default=None)
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    lenet = advx.Classifier(train_lenet()) if args.model in (None, "lenet") else None
    t_train = time.perf_counter() - t0
    xd, yd = advx.data.load("mnist-demo", split="test")  # 1000 digits
    trades = advx.Classifier(trades_smallcnn())
    xm, ym = mnist_test(4000)

    det_rows, notes, cal_rows = [], [], []
    if args.only in (None, "detect"):
        for key, name, clf, split in (
            ("lenet", "demo LeNet", lenet, (xd[:500], yd[:500], xd[500:], yd[500:])),
            (
                "trades",
                "TRADES SmallCNN",
                trades,
                (xm[:1000], ym[:1000], xm[1000:2000], ym[1000:2000]),
            ),
        ):
            if args.model not in (None, key):
                continue
            rows, note = detection(name, clf, *split, args)
            det_rows += rows
            notes.append(note)
    if args.only in (None, "calibrate"):
        if args.model in (None, "lenet"):
            cal_rows.append(
                calibration(
                    "demo LeNet", lenet, xd[:600], yd[:600], xd[600:], yd[600:], 0.02, 0.05, 0.05
                )
            )
    if args.only in (None, "calibrate") and args.model in (None, "trades"):
        cal_rows.append(
            calibration(
                "TRADES SmallCNN", trades, xm[:2000], ym[:2000], xm[2000:4000], ym[2000:4000],
                0.01, 0.05, 0.05,
            )
        )  # fmt: skip
    if cal_rows:
        print(cal_rows, flush=True)

    cmd = "python benchmarks/bench_guard_detect.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("write",) and v is not None
    )
    md = [
        "## Guard: detection and calibration (issue 13)",
        "",
        f"Command: `{cmd} --write`",
        "",
        f"Machine: {machine()}, loaded (2 cores shared by several engineers)"
        + (f"; LeNet trained in {t_train:.0f} s" if lenet is not None else "")
        + f". {versions()}.",
        "",
        "The guard: feature squeezing (bits:1, median:2), the energy OOD score and the "
        "confidence floor, calibrated together (`guard.calibrate(x, y, fpr=0.05)`: the union "
        "of the three rules flags 5% of clean inputs). *stopped*: share of the model's "
        "misclassified adversarial examples that the guard does not accept (abstain/review); "
        "*evaded*: share of attacked points accepted with a wrong label (what the attacker "
        "needs). Adaptive rows attack `DetectorAware(model, guard.as_detector())`: the whole "
        "policy as an 11th logit, targeted to the most likely other class, BPDA through the "
        "squeezers.",
        "",
    ]
    if det_rows:
        md.append(
            table(
                ["model", "attack", "adaptive", "misclassified", "stopped", "evaded", "seconds"],
                det_rows,
            )
        )
        md += [""] + [f"- {n}" for n in notes] + [""]
    if cal_rows:
        md += [
            "Calibration with a selective-risk target: the guarantees stated on the calibration "
            "data vs what held-out clean data shows (disjoint splits; the FPR of this policy "
            "counts the detector rules, the confidence floor is set by the risk test; intervals "
            "are 95% Clopper-Pearson).",
            "",
            table(
                [
                    "model",
                    "n calibration / held-out",
                    "FPR target: stated [interval]",
                    "FPR measured on held-out",
                    "selective risk guarantee",
                    "selective risk measured on held-out [95%]",
                    "error without the guard",
                    "coverage (calibration)",
                    "coverage (held-out)",
                ],
                cal_rows,
            ),
            "",
        ]
    text = "\n".join(md)
    print(text)
    if args.write:
        write_section("guard-detect", text)


if __name__ == "__main__":
    main()
