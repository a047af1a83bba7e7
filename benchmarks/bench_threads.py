"""PGD-40 at each torch thread count, on this machine as it is (shared, loaded or not).

    python benchmarks/bench_threads.py --n 200 --repeats 3 --threads 1,2 --write

PGD-40 (Linf 0.3) on the TRADES SmallCNN and the first --n MNIST test digits. The thread counts
are interleaved (1, 2, 1, 2, ...) so that a change in the machine's load hits them alike; times
are medians. The load average before and after is printed: the point is what a shared machine
does to torch's thread pool, and what advx._threads.configure() would pick here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import advx, machine, mnist_test, table, trades_smallcnn, write_section

from advx import _threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]

    default = torch.get_num_threads()
    chosen = _threads.configure()
    net = trades_smallcnn()
    x, y = mnist_test(args.n)
    clf = advx.Classifier(net)
    attack = advx.PGD(advx.Linf(0.3), steps=40)
    attack(clf, x[:50], y[:50])  # warm-up: chunk sizes measured once per shape

    load0 = os.getloadavg()
    times: dict[int, list[float]] = {t: [] for t in counts}
    for _ in range(args.repeats):
        for t in counts:
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            attack(clf, x, y)
            times[t].append(time.perf_counter() - t0)
            print(f"threads {t}: {times[t][-1]:.2f} s", flush=True)
    load1 = os.getloadavg()
    best = min(counts, key=lambda t: statistics.median(times[t]))
    rows = [
        [
            t,
            statistics.median(times[t]),
            ", ".join(f"{s:.2f}" for s in times[t]),
            statistics.median(times[t]) / statistics.median(times[best]),
        ]
        for t in counts
    ]
    md = "\n".join(
        [
            "## Threads: PGD-40 at each torch thread count on a shared machine (issue 12)",
            "",
            f"`python benchmarks/bench_threads.py --n {args.n} --repeats {args.repeats} "
            f"--threads {args.threads} --write`",
            "",
            f"Machine: {machine()}; affinity {len(os.sched_getaffinity(0))} CPUs, cgroup quota "
            f"{_threads.cgroup_cpu_limit()}; torch's default {default} threads, "
            f"`advx._threads.configure()` chose {chosen}. Load average (1, 5, 15 min) "
            f"{load0[0]:.1f}, {load0[1]:.1f}, {load0[2]:.1f} before and "
            f"{load1[0]:.1f}, {load1[1]:.1f}, {load1[2]:.1f} after.",
            "",
            table(["threads", "median s", "runs s", "/ fastest"], rows),
        ]
    )
    print(md)
    if args.write:
        write_section("bench_threads", md)


if __name__ == "__main__":
    main()
