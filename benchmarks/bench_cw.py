"""CW at short budgets: advx CW 5 x 100 steps next to torchattacks' CW (c = 1, 500 steps).

    python benchmarks/bench_cw.py --n 100 --default-n 100 --write

On undefended MNIST models trained here in seconds on the embedded digits (advx.data.load's
``mnist-demo``, 4,000 training digits): the built-in ``lenet`` of advx.zoo trained as the demo
trains it (4 epochs of Adam at 2e-3, batch 64, seed 0), and a classic LeNet-5 (two 5x5
convolutions with max-pooling, 120-84-10 ReLU head; same schedule). The points are the first
--n test digits each model classifies correctly. Every attack runs on the same points in the
same process, one after the other; each output is re-checked here with one forward pass of the
plain net: a point that is not misclassified, or outside [0, 1], counts as a failure with an
infinite distance, so a lower success rate cannot hide behind a smaller median.

Columns: success rate; median L2 over all points (failures inf); median L2 on the points both
advx's run and torchattacks' broke (each advx row against torchattacks); wall time. The last
row is advx's default schedule (9 x 1,000 steps, lr 0.01) on the first --default-n points.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import advx, load, machine, table, versions, write_section
from torch import nn

INF = math.inf


class LeNet5(nn.Module):
    """LeCun et al.'s LeNet-5 layout for 28x28 inputs (padding 2 on the first convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def trained(make: Callable[[], nn.Module]) -> nn.Module:
    """The demo's recipe: 4 epochs of Adam at 2e-3 on the 4,000 embedded training digits."""
    from advx.training import Schedule, fit

    x, y = load("mnist-demo", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = make()
    fit(net, x, y, schedule=Schedule(epochs=4, lr=2e-3), batch_size=64, seed=0, progress=False,
        monitor=None)  # fmt: skip
    net.eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    return net


def distances(net: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Per-sample L2; inf where x_adv is not misclassified, not finite or outside the box."""
    x_adv = x_adv.detach()
    with torch.no_grad():
        ok = (net(x_adv).argmax(1) != y) & torch.isfinite(x_adv.flatten(1)).all(1)
    inside = (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    d = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where(ok & inside, d, torch.full_like(d, INF))


def run_model(label: str, net: nn.Module, x, y, args) -> tuple[str, dict]:
    import torchattacks

    runs: list[tuple[str, str, Callable]] = []

    def ours(name: str, attack):
        runs.append((name, "advx", lambda xx, yy: attack(advx.Classifier(net), xx, yy).x_adv))

    for lr in args.lrs:
        ours(f"CW 5x100 lr {lr:g}", advx.CW(steps=100, search_steps=5, lr=lr))
    runs.append(
        (
            "CW c=1 500 steps lr 0.01",
            "torchattacks",
            lambda xx, yy: torchattacks.CW(net, c=1, steps=500, lr=0.01)(xx, yy),
        )
    )
    got: dict[str, tuple[torch.Tensor, float]] = {}
    for name, lib, run in runs:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        x_adv = run(x, y)
        secs = time.perf_counter() - t0
        got[f"{lib} {name}"] = (distances(net, x_adv, x, y), secs)
        print(f"  {label} {lib} {name}: {secs:.1f}s", file=sys.stderr, flush=True)
    ta = next(d for key, (d, _) in got.items() if key.startswith("torchattacks"))
    if args.default_n:
        m = min(args.default_n, len(x))
        t0 = time.perf_counter()
        r = advx.CW()(advx.Classifier(net), x[:m], y[:m])
        secs = time.perf_counter() - t0
        got[f"advx CW 9x1000 lr 0.01 (default), first {m}"] = (
            distances(net, r.x_adv, x[:m], y[:m]),
            secs,
        )
        print(f"  {label} advx default: {secs:.1f}s", file=sys.stderr, flush=True)
    rows = []
    for key, (d, secs) in got.items():
        ok = torch.isfinite(d)
        t = ta[: len(d)]
        both = ok & torch.isfinite(t)
        rows.append(
            [
                key,
                f"{int(ok.sum())}/{len(d)} ({float(ok.float().mean()):.0%})",
                float(d.median()),
                f"{float(d[both].median()):.3f} vs {float(t[both].median()):.3f} "
                f"({int(both.sum())})"
                if not key.startswith("torchattacks") and bool(both.any())
                else "",
                secs,
            ]
        )
    text = (
        f"**{label}** (n = {len(x)} correctly classified test digits)\n\n"
        + table(
            [
                "attack",
                "success",
                "median L2 (failures inf)",
                "median L2 on both broke: this vs torchattacks (points)",
                "seconds",
            ],
            rows,
        )
        + "\n"
    )
    return text, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--default-n", type=int, default=100, help="points for the 9 x 1000 run")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--models", nargs="+", default=["lenet", "lenet5"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the RESULTS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    xs, ys = load("mnist-demo", split="test")
    parts = []
    for m in args.models:
        net = trained(lambda: advx.zoo.build("lenet")) if m == "lenet" else trained(LeNet5)
        with torch.no_grad():
            ok = net(xs).argmax(1) == ys
        x, y = xs[ok][: args.n].clone(), ys[ok][: args.n].clone()
        label = "advx.zoo lenet (the demo's CNN)" if m == "lenet" else "LeNet-5"
        text, _ = run_model(f"{label}, clean accuracy {float(ok.float().mean()):.1%}", net, x, y,
                            args)  # fmt: skip
        parts.append(text)
    import subprocess

    load_avg = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    command = (
        f"python benchmarks/bench_cw.py --n {args.n} --default-n {args.default_n} --lrs "
        f"{' '.join(f'{lr:g}' for lr in args.lrs)} --models {' '.join(args.models)} "
        f"--threads {args.threads}"
    )
    body = "\n".join(parts) + (
        f"\nCommand: `{command}`; {machine()}; load: {load_avg}; {versions('torchattacks')}\n"
    )
    print(body)
    if args.write:
        write_section("bench_cw", "## CW at short budgets (issue 11)\n\n" + body)


if __name__ == "__main__":
    main()
