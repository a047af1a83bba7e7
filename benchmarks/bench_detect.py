"""Feature squeezing on the demo LeNet: how much it detects, before and after the attacker adapts.

    python benchmarks/bench_detect.py --n 200

The LeNet of ``advx demo`` is trained on the mnist-demo train split (4 epochs, seed 0). Feature
squeezing (Xu et al., 2018; 1-bit depth and 2x2 median, the paper's MNIST squeezers) is
calibrated to a 5% false-positive rate on the first 500 clean test images; the attacks run on
the first ``n`` correctly classified test images after those 500 (held out from calibration).

For each attack: the share of points it makes misclassified, the share of those adversarial
examples the detector flags, and the share of points both misclassified and not flagged (what
the attacker needs against a guarded model). The adaptive attack is a targeted PGD on
``DetectorAware`` (the classifier's 10 logits and a "detected" logit, BPDA through the
squeezers), each point targeted to its most likely other class (Carlini & Wagner, 2017).
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import advx, machine, table, versions

from advx.defenses import BitDepth, DetectorAware, FeatureSqueezing, adaptive_success


def train_lenet() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.build("lenet")
    x, y = advx.data.load("mnist-demo", split="train")
    schedule = advx.training.Schedule(epochs=4, lr=2e-3)
    advx.training.fit(net, x, y, schedule=schedule, batch_size=64, seed=0)
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--n", type=int, default=200, help="attacked points (correctly classified, held out)"
    )
    ap.add_argument("--calibration", type=int, default=500)
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--adaptive-steps", type=int, default=100)
    ap.add_argument(
        "--adaptive-loss", nargs="+", default=["ce"], help="PGD losses for the adaptive attack"
    )
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference row: targeted PGD (BPDA) on the 1-bit-squeezed LeNet alone",
    )
    ap.add_argument(
        "--scale", type=float, default=10.0, help="DetectorAware's score-to-logit scale"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    net = train_lenet()
    t_train = time.perf_counter() - t0
    clf = advx.Classifier(net)
    x_test, y_test = advx.data.load("mnist-demo", split="test")
    m = args.calibration
    fs = FeatureSqueezing(clf).calibrate(x_test[:m], fpr=args.fpr)
    held_x, held_y = x_test[m:], y_test[m:]
    fpr_held = float(fs.detect(held_x).float().mean())
    with torch.no_grad():
        correct = clf.predict(held_x) == held_y
    x, y = held_x[correct][: args.n], held_y[correct][: args.n]
    n = len(y)
    eps = args.eps

    attacks = [
        ("PGD (Linf 0.3, 40 steps)", advx.PGD(advx.Linf(eps), steps=40)),
        (
            "CW (L2, min-norm, 5x100 steps)",
            advx.CW(steps=100, search_steps=5, initial_c=1.0, lr=0.05),
        ),
    ]
    if "square" in advx.attacks.list():
        attacks.append(
            (
                "Square (Linf 0.3, 1000 queries)",
                advx.attacks.create("square", advx.Linf(eps), queries=1000),
            )
        )
    else:
        print("Square is not registered: left out")

    rows = []
    pgd_share = None
    pgd_detected = None
    for label, attack in attacks:
        t0 = time.perf_counter()
        r = attack(clf, x, y)
        secs = time.perf_counter() - t0
        flagged = fs.detect(r.x_adv)
        ok = r.success
        detected = float(flagged[ok].float().mean()) if bool(ok.any()) else float("nan")
        evade = float(adaptive_success(clf, fs, r.x_adv, y).float().mean())
        dist = float(r.distance[ok].median()) if bool(ok.any()) else float("nan")
        if attack.name == "pgd":
            pgd_share, pgd_detected = evade, detected
        rows.append(
            [
                label,
                "no",
                f"{ok.float().mean():.1%}",
                f"{detected:.1%}",
                f"{evade:.1%}",
                f"{dist:.3f} ({r.threat.norm})",
                f"{secs:.1f}",
            ]
        )

    with torch.no_grad():
        target = (
            clf(x).scatter(1, y.view(-1, 1), float("-inf")).argmax(1)
        )  # most likely other class
    combined = DetectorAware(clf, fs, scale=args.scale)
    adaptive = {}
    for loss in args.adaptive_loss:
        t0 = time.perf_counter()
        r = advx.PGD(advx.Linf(eps), steps=args.adaptive_steps, loss=loss)(
            combined, x, y, target=target
        )
        secs = time.perf_counter() - t0
        pred_wrong = clf.predict(r.x_adv) != y
        flagged = fs.detect(r.x_adv)
        detected = (
            float(flagged[pred_wrong].float().mean()) if bool(pred_wrong.any()) else float("nan")
        )
        evade = float(adaptive_success(clf, fs, r.x_adv, y).float().mean())
        adaptive[loss] = (evade, detected)
        dist = float(r.distance[pred_wrong].median()) if bool(pred_wrong.any()) else float("nan")
        rows.append(
            [
                f"PGD on DetectorAware ({loss}, targeted, Linf 0.3, {args.adaptive_steps} steps,"
                " BPDA)",
                "yes",
                f"{pred_wrong.float().mean():.1%}",
                f"{detected:.1%}",
                f"{evade:.1%}",
                f"{dist:.3f} (linf)",
                f"{secs:.1f}",
            ]
        )

    if not args.no_reference:
        # An undetected misclassification needs the 1-bit squeezed input misclassified too (else
        # the two softmaxes differ by about 2): how often PGD can do that bounds the adaptive
        # attack.
        t0 = time.perf_counter()
        r = advx.PGD(advx.Linf(eps), steps=args.adaptive_steps)(
            BitDepth(clf, 1), x, y, target=target
        )
        secs = time.perf_counter() - t0
        rows.append(
            [
                "reference: PGD on BitDepth(LeNet, 1) alone (targeted, Linf 0.3, "
                f"{args.adaptive_steps} steps, BPDA)",
                "-",
                f"{r.success.float().mean():.1%}",
                "-",
                "-",
                "-",
                f"{secs:.1f}",
            ]
        )

    header = [
        "attack",
        "adaptive",
        "misclassified",
        "detected (of misclassified)",
        "misclassified and undetected",
        "median distance",
        "seconds",
    ]
    print(
        f"LeNet (mnist-demo, 4 epochs, trained in {t_train:.0f} s), clean accuracy on the held-out "
        f"test images {float(correct.float().mean()):.1%}; feature squeezing (bits:1, median:2) "
        f"calibrated on {m} clean test images to {args.fpr:.0%} FPR: threshold {fs.threshold:.4f}, "
        f"FPR on the {len(held_y)} held-out clean images {fpr_held:.1%}; {n} attacked points\n"
    )
    print(table(header, rows))
    best = max(adaptive, key=lambda k: adaptive[k][0])
    print(
        f"\nnon-adaptive PGD: {pgd_detected:.1%} of its adversarial examples detected, "
        f"{pgd_share:.1%} of points misclassified and undetected; "
        f"adaptive PGD ({best}): {adaptive[best][1]:.1%} detected, "
        f"{adaptive[best][0]:.1%} misclassified and undetected"
    )
    print(f"\n{machine()}; {versions()}")


if __name__ == "__main__":
    main()
