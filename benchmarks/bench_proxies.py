"""CPU proxies of the per-iteration overhead of the inner loops (issue 15).

    python benchmarks/bench_proxies.py [--n 200] [--every K] [--write LABEL]

On a GPU advx is overhead-bound: what an inner loop costs besides the model is the number of
small kernels it launches and the host syncs it waits on. Both can be counted on a CPU with
torch.profiler. For Square, APGD, PGD and FAB on an MNIST LeNet5 (trained here for one epoch on
the embedded slice) and ``--n`` MNIST test points, this counts, per iteration (Square: per
query; the others: per step):

- ops: top-level aten ops, excluding the model's own forward and backward (the net's forward
  runs inside a ``record_function`` scope, its backward inside autograd's engine events);
- syncs: host syncs, i.e. ``aten::_local_scalar_dense`` (behind ``item``, ``is_nonzero``,
  ``bool(t)``, ``int(t)``) and ``aten::nonzero`` (behind boolean-mask indexing), anywhere
  outside the model.

Per iteration means the difference between a run of ``K2`` and one of ``K1`` iterations,
divided by ``K2 - K1``, so that the set-up and the final evaluation drop out. The eps is small
enough that almost no point is broken within ``K2`` iterations (early stopping would otherwise
end the loop).

The loops compact their batch (drop the samples that are done: one host sync) every ``K``
iterations, ``advx.attacks._lanes.COMPACT_EVERY`` per device type: 1 on a CPU, more on a GPU,
where the syncs are what costs. The proxies stand for a GPU: they run with the CUDA setting
(``--every``, default the CUDA entry), set through ``ADVX_COMPACT_EVERY``; ``K2 - K1`` is a
multiple of 16, so that the count of compactions between the two runs is exact for K = 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

os.environ.setdefault("ADVX_PROGRESS", "0")

from _common import advx, load, machine, mnist_test, table, write_section

try:
    from advx.attacks._lanes import COMPACT_EVERY, ENV
except ImportError:  # the code before the lanes (a "before" run): compaction every iteration
    COMPACT_EVERY, ENV = {"cpu": 1, "cuda": 1}, "ADVX_COMPACT_EVERY"

try:
    from advx.attacks._side import ENV as SIDE_ENV
    from advx.attacks._side import RUNS_AT_ONCE
except ImportError:  # before the targets went side by side: one run at a time
    RUNS_AT_ONCE, SIDE_ENV = {"cpu": 1, "cuda": 1}, "ADVX_RUNS_AT_ONCE"

SYNCS = {"aten::_local_scalar_dense", "aten::nonzero"}


def lenet5() -> nn.Module:
    """Two 3x3 conv layers of 32 and 64 channels with max-pooling, then 200 hidden units."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 32, 26, 26) -> (N, 32, 13, 13)
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 64, 11, 11) -> (N, 64, 5, 5)
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 200),
        nn.ReLU(),
        nn.Linear(200, 10),
    )


def trained_lenet5(epochs: int = 2) -> nn.Module:
    """A LeNet5 trained with Adam on the embedded MNIST slice (4,000 images), seeded."""
    x, y = load("mnist-demo", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = lenet5()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            for b in range(0, len(x), 64):
                i = order[b : b + 64]
                loss = nn.functional.cross_entropy(net(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval()


class Scoped(nn.Module):
    """The net, its forward inside a profiler scope so that its ops can be told apart."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with record_function("MODEL"):
            return self.net(x)


def count(fn, names: dict[str, int] | None = None) -> tuple[int, int, int]:
    """(top-level aten ops outside the model, host syncs outside the model, calls of the
    model) of one call; ``names`` gets the count of each op's name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    ops = syncs = calls = 0
    for e in events:
        if e.name == "MODEL":
            calls += 1
        # walk up to the top-level event: inside the model's scope or autograd's engine is the
        # model's own work
        top, own = e, False
        while top.cpu_parent is not None:
            top = top.cpu_parent
            if top.name == "MODEL":
                own = True
        if own or top.name == "MODEL" or top.name.startswith("autograd::engine"):
            continue
        if e.cpu_parent is None and e.name.startswith("aten::"):
            ops += 1
            if names is not None:
                names[e.name] = names.get(e.name, 0) + 1
        if e.name in SYNCS:
            syncs += 1
    return ops, syncs, calls


def attacks(eps: float) -> dict[str, tuple]:
    """name -> (build(k): the attack with k iterations, K1, K2)."""
    linf = advx.Linf(eps)
    return {
        "square": (lambda k: advx.Square(linf, queries=k), 20, 52),
        "apgd": (lambda k: advx.APGD(linf, loss="ce", steps=k), 16, 48),
        "apgd-t": (lambda k: advx.APGD(linf, loss="dlr-targeted", steps=k, targets=1), 16, 48),
        "pgd": (lambda k: advx.PGD(linf, steps=k), 16, 48),
        "fab-t": (lambda k: advx.FAB(linf, steps=k, targeted=True, targets=1), 16, 32),
        "fab": (lambda k: advx.FAB(linf, steps=k), 16, 32),
        # AutoAttack's settings: nine targets, one after another or side by side
        "apgd-t9": (lambda k: advx.APGD(linf, loss="dlr-targeted", steps=k, targets=9), 16, 48),
        "fab-t9": (lambda k: advx.FAB(linf, steps=k, targeted=True, targets=9), 16, 32),
    }


def wall(clf, x, y, eps: float) -> None:
    """Wall and CPU seconds of one PGD-40, one APGD-CE-100 and one APGD-T-100 call (nine
    targets; early stop on), after a warm-up."""
    linf = advx.Linf(eps)
    for name, attack in (
        ("pgd-40", advx.PGD(linf, steps=40)),
        ("apgd-ce-100", advx.APGD(linf, loss="ce", steps=100)),
        ("apgd-t9-100", advx.APGD(linf, loss="dlr-targeted", steps=100, targets=9)),
    ):
        # warm-up on every point: the chunk tuner (with --chunk auto), the allocator
        dataclasses.replace(attack, steps=2)(clf, x, y)
        t0, c0 = time.perf_counter(), time.process_time()
        r = attack(clf, x, y)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        # the CPU time of the process: less moved than the wall time by the other jobs
        print(
            f"wall {name} {seconds:.3f} s cpu {cpu:.3f} s broken {int(r.success.sum())}/{len(x)}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.02)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument(
        "--chunk",
        choices=["one", "auto"],
        default="one",
        help="one: every pass in one chunk, as on a GPU (the default); auto: the CPU tuner's",
    )
    ap.add_argument(
        "--every",
        type=int,
        default=COMPACT_EVERY["cuda"],
        help="iterations between compactions (default: the CUDA setting; 1: the CPU's)",
    )
    ap.add_argument(
        "--runs-at-once",
        type=int,
        default=RUNS_AT_ONCE["cuda"],
        help="APGD-T's and FAB-T's targets side by side (default: the CUDA setting; 1: the CPU's)",
    )
    ap.add_argument("--list", action="store_true", help="print the ops per iteration by name")
    ap.add_argument(
        "--wall",
        action="store_true",
        help="instead: the wall time of one PGD-40, APGD-CE-100 and APGD-T-100 call on the points",
    )
    ap.add_argument("--write", metavar="LABEL", default=None, help="append to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ[ENV] = str(args.every)
    os.environ[SIDE_ENV] = str(args.runs_at_once)
    print(
        f"compaction every {args.every} iteration(s) ({ENV}; the CUDA setting is "
        f"{COMPACT_EVERY['cuda']}, the CPU's {COMPACT_EVERY['cpu']}); {args.runs_at_once} "
        f"run(s) at once ({SIDE_ENV}; CUDA {RUNS_AT_ONCE['cuda']}, CPU {RUNS_AT_ONCE['cpu']})"
    )

    clf = advx.Classifier(
        Scoped(trained_lenet5()), batch_size=1 << 20 if args.chunk == "one" else "auto"
    )
    x, y = mnist_test(args.n)
    if args.wall:
        wall(clf, x, y, args.eps)
        return
    rows = []
    for name, (build, k1, k2) in attacks(args.eps).items():
        if args.only and name not in args.only:
            continue
        build(2)(clf, x, y)  # warm-up: the chunk tuner, allocator
        r = build(k2)(clf, x, y)
        n1: dict[str, int] = {}
        n2: dict[str, int] = {}
        o1, s1, c1 = count(lambda: build(k1)(clf, x, y), n1)  # noqa: B023
        o2, s2, c2 = count(lambda: build(k2)(clf, x, y), n2)  # noqa: B023
        if args.list:
            diff = {k: (n2.get(k, 0) - n1.get(k, 0)) / (k2 - k1) for k in n2}
            for k, v in sorted(diff.items(), key=lambda kv: -kv[1]):
                if v:
                    print(f"    {v:6.2f}  {k}")
        per_ops, per_syncs = (o2 - o1) / (k2 - k1), (s2 - s1) / (k2 - k1)
        per_calls = (c2 - c1) / (k2 - k1)
        broken = int(r.success.sum())
        rows.append(
            [name, f"{per_ops:.1f}", f"{per_syncs:.2f}", f"{per_calls:.2f}", f"{broken}/{args.n}"]
        )
        print(
            f"{name:8s} ops/iter {per_ops:7.1f}  syncs/iter {per_syncs:5.2f}  "
            f"model calls/iter {per_calls:5.2f}  broken {broken}"
        )
    md = table(
        [
            "attack",
            "aten ops / iteration (excl. model)",
            "host syncs / iteration",
            "model calls / iteration",
            "broken",
        ],
        rows,
    )
    print(md)
    if args.write:
        write_section(
            f"CPU proxies ({args.write})",
            f"`python benchmarks/bench_proxies.py --n {args.n} --eps {args.eps} "
            f"--chunk {args.chunk} --every {args.every} --runs-at-once {args.runs_at_once}`, "
            f"MNIST LeNet5, {args.n} test points, Linf {args.eps}; {machine()}\n\n{md}",
        )


if __name__ == "__main__":
    main()
