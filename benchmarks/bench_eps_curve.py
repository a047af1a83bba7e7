"""The audit's eps curve: one APGD-CE run per eps ("runs", the old default), one FMN run's
per-sample distances ("min-norm"), and FMN below eps / the cascade at eps / APGD-CE above it
("mixed", the new default), on the same samples after the same cascade.

    python benchmarks/bench_eps_curve.py --n 200 --repeats 2 --write

Models: the TRADES SmallCNN (Linf 0.3 and L2 2.0) and the demo's undefended LeNet (trained here
for one epoch on the embedded digits 1000.., as `advx demo` does; Linf 0.1). The cascade is the
APGD-CE (50 steps, SUITE) on the first --n test images (the audit's curve uses the
first 200 by default); both curves then run on the same cascade state, alternately, --repeats
times each (median seconds). The curve's points include the cascade's own adversarial examples
(as the audit does); "broke beyond cascade" counts what the curve's attack broke at the audited
eps that the cascade left robust.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import torch
from _common import SHARED, advx, load, machine, mnist_test, table, trades_smallcnn, write_section

from advx.audit.eps_curve import _eps_curve

# the cascade before the curve: APGD-CE alone (a weaker cascade than "fast": on this shared
# 2-core machine one SmallCNN step on 100 images took 3.5 s of wall time)
SUITE = [{"name": "apgd", "steps": 50}]


def demo_lenet() -> torch.nn.Module:
    from advx.training import fit

    x, y = load("mnist-demo")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.build("lenet")
    fit(net, x[1000:], y[1000:], epochs=1, batch_size=64, seed=0, progress=False, monitor=None)
    return net.eval()


class Counting(torch.nn.Module):
    """The net, counting the samples that go through its forward pass (a cost that does not
    depend on the machine's load, unlike seconds)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.samples = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        return self.net(x)


def state_of(report) -> types.SimpleNamespace:
    """What _eps_curve reads of the cascade state, from the report's per-sample arrays."""
    s = report.samples
    return types.SimpleNamespace(
        clean_correct=torch.tensor(s.clean_correct),
        broken_by=torch.tensor(s.broken_by),
        distance=torch.tensor(
            [float("nan") if d is None else d for d in s.distance], dtype=torch.float64
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--l2", action="store_true", help="also the SmallCNN at L2 2.0")
    args = ap.parse_args()
    load_avg = os.getloadavg()
    cases = []
    smallcnn = Counting(trades_smallcnn())
    xm, ym = mnist_test(args.n)
    xd, yd = load("mnist-demo", n=args.n)
    lenet = Counting(demo_lenet())
    cases.append(("demo LeNet (1 epoch)", lenet, xd, yd, advx.Linf(0.1)))
    cases.append(("TRADES SmallCNN", smallcnn, xm, ym, advx.Linf(0.3)))
    if args.l2:
        cases.append(("TRADES SmallCNN", smallcnn, xm, ym, advx.L2(2.0)))
    rows, curves = [], []
    for label, net, x, y, threat in cases:
        model = advx.Classifier(net, bounds=(0, 1))
        report = advx.audit(model, x, y, threat, suite=SUITE, eps_curve=None, checks=False)
        print(f"{label} {threat}: cascade robust {report.robust_accuracy:.3f}", flush=True)
        full = state_of(report)
        times: dict[str, list[float]] = {"runs": [], "min-norm": [], "auto": []}
        passes: dict[str, int] = {}
        out: dict[str, dict] = {}
        for _ in range(args.repeats):
            for spec in ("runs", "min-norm", "auto"):
                t0 = time.perf_counter()
                net.samples = 0
                out[spec] = _eps_curve(model, x, y, threat, spec, full, seed=0, subset=args.n)  # type: ignore[arg-type]
                times[spec].append(time.perf_counter() - t0)
                passes[spec] = net.samples
                print(f"{label} {threat} {spec}: {times[spec][-1]:.1f} s", flush=True)
        eps0 = float(threat.eps)
        for spec in ("runs", "min-norm", "auto"):
            c = out[spec]
            i = min(range(len(c["eps"])), key=lambda k: abs(c["eps"][k] - eps0))
            rows.append(
                [
                    label,
                    str(threat),
                    spec,
                    c["attack"],
                    statistics.median(times[spec]),
                    statistics.median(times["runs"]) / statistics.median(times[spec]),
                    passes[spec] / max(1, sum(report.samples.clean_correct[: args.n])),
                    f"{c['robust_accuracy_cascade']:.3f}",
                    f"{c['robust_accuracy'][i]:.3f}",
                    c["broken_beyond_cascade"],
                    f"{c['robust_accuracy_large_eps']:.3f}",
                ]
            )
            curves.append(
                f"- {label}, {threat}, {spec} ({c['attack']}): "
                + ", ".join(
                    f"{e:.3g}: {a:.3f}" + ("*" if k else "")
                    for e, a, k in zip(c["eps"], c["robust_accuracy"], c["from_cascade"])
                )
            )
    header = [
        "model", "threat", "curve", "attack", "median s", "speed-up vs runs",
        "forward passes per attacked sample",
        "cascade robust (same n)", "curve at eps", "broke beyond cascade", "at large eps",
    ]  # fmt: skip
    md = (
        f"## Audit eps curve: APGD-CE per eps (runs), one FMN run (min-norm), mixed; n={args.n}\n\n"
        f"`python benchmarks/bench_eps_curve.py --n {args.n} --repeats {args.repeats} --write` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; load average "
        f"before the run {load_avg[0]:.2f}, {load_avg[1]:.2f}, {load_avg[2]:.2f}).\n\n"
        + table(header, rows)
        + "\n\nThe curves (robust accuracy at each eps; * where the cascade's own examples "
        "lowered the point; runs has its own grid):\n\n" + "\n".join(curves) + "\n"
    )
    print(md)
    if args.write:
        write_section("bench-eps-curve", md)


if __name__ == "__main__":
    torch.manual_seed(0)
    _ = SHARED
    main()
