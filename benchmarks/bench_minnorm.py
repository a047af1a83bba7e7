"""Minimum-norm attacks: advx DDN, FMN (Linf, L2, L1) and DeepFool next to foolbox 3 and adv-lib.

    python benchmarks/bench_minnorm.py --n 100 --write

On the TRADES SmallCNN (MNIST, adversarially trained) and an undefended LeNet (2 epochs of
cross-entropy on the full MNIST training set, seeded, as in bench_whitebox.py; cached with
--cache), the first --n MNIST test images the model classifies correctly. Every library attacks
the same points in the same process, one after the other, with the same number of steps and
its own defaults otherwise (adv-lib's DDN without its 256-level quantization, so that every
implementation works in the same continuous box). Each library's output is re-checked here with
one forward pass of the plain model: a point that is not misclassified counts as a failure, with
an infinite distance, so a lower success rate cannot hide behind a smaller median.

Per norm and model, the reference distance of a sample is the smallest found by any attack of
any library in the run; an implementation's optimality (as in AttackBench, Cina et al. 2024) is
the mean over samples of reference / distance (1.0: always the best; a failure scores 0).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from _common import (
    SHARED,
    advx,
    cifar_balanced,
    load,
    machine,
    mnist_test,
    resnet20_normalized,
    table,
    trades_smallcnn,
    versions,
)

INF = math.inf


def _stub_adv_lib_imports() -> None:
    """adv_lib.attacks imports torchvision (LPIPS only) and visdom (logging only): neither is
    needed here, and torchvision breaks beside the CPU torch build (PEERS.md)."""
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")  # type: ignore[attr-defined]
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.models"] = tv.models  # type: ignore[attr-defined]
    if "visdom" not in sys.modules:
        vis = types.ModuleType("visdom")
        vis.Visdom = object  # type: ignore[attr-defined]
        sys.modules["visdom"] = vis


def undefended_lenet(cache: Path | None) -> torch.nn.Module:
    if cache is not None and cache.exists():
        net = advx.zoo.build("lenet")
        net.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return net.eval()
    from advx.training import fit

    x, y = load(SHARED / "data" / "mnist", split="train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = advx.zoo.build("lenet")
    fit(net, x, y, epochs=2, batch_size=128, lr=2e-3, seed=0, progress=False, monitor=None)
    if cache is not None:
        torch.save(net.state_dict(), cache)
    return net.eval()


_WRAPPERS: dict[int, advx.Classifier] = {}


def wrapper(net: torch.nn.Module) -> advx.Classifier:
    """One advx.Classifier per model, shared by every advx attack on it, as a user attacking a
    model repeatedly would keep it: its chunk sizes are measured once, on the first batch (in
    the warm-up), not again inside each attack's timing (about 1 s per attack on the SmallCNN
    at n = 100, more under load)."""
    if id(net) not in _WRAPPERS:
        _WRAPPERS[id(net)] = advx.Classifier(net)
    return _WRAPPERS[id(net)]


def distances(net, x_adv, x, y, norm: str) -> torch.Tensor:
    """Per-sample distance in ``norm``; inf where x_adv is not misclassified or not finite."""
    x_adv = x_adv.detach()
    with torch.no_grad():
        ok = (net(x_adv).argmax(1) != y) & torch.isfinite(x_adv.flatten(1)).all(1)
        inside = (x_adv >= -1e-6).flatten(1).all(1) & (x_adv <= 1 + 1e-6).flatten(1).all(1)
    d = advx.ThreatModel(norm, INF).distance(x_adv, x)
    return torch.where(ok & inside, d, torch.full_like(d, INF))


def attacks_for(norm: str, steps: int, df_steps: int):
    """(name, library, run(net, x, y) -> x_adv, extra) for one norm."""
    import foolbox as fb

    _stub_adv_lib_imports()
    import adv_lib.attacks as al

    p = {"linf": INF, "l2": 2, "l1": 1}[norm]
    threat = advx.ThreatModel(norm, INF)
    out: list[tuple[str, str, Callable]] = []

    def ours(name: str, attack):
        def run(net, x, y):
            r = attack(wrapper(net), x, y)
            return r.x_adv, r

        out.append((name, "advx", run))

    def foolbox(name: str, attack):
        def run(net, x, y):
            fmodel = fb.PyTorchModel(net, bounds=(0, 1))
            raw, _, _ = attack(fmodel, x, y, epsilons=None)
            return raw, None

        out.append((name, "foolbox", run))

    def adv_lib(name: str, fn):
        out.append((name, "adv-lib", lambda net, x, y: (fn(net, x, y), None)))

    fmn_fb = {"linf": fb.attacks.LInfFMNAttack, "l2": fb.attacks.L2FMNAttack,
              "l1": fb.attacks.L1FMNAttack}[norm]  # fmt: skip
    if norm == "l2":
        # the yardstick for DDN and FMN: CW-L2 at its default schedule (9 x 1,000)
        ours("CW-9x1000", advx.CW(advx.L2(float("inf"))))
        ours(f"DDN-{steps}", advx.DDN(steps=steps))
        foolbox(f"DDN-{steps}", fb.attacks.DDNAttack(steps=steps))
        adv_lib(f"DDN-{steps}", lambda net, x, y: al.ddn(net, x, y, steps=steps, levels=None))
    ours(f"FMN-{steps}", advx.FMN(threat, steps=steps))
    foolbox(f"FMN-{steps}", fmn_fb(steps=steps))
    adv_lib(f"FMN-{steps}", lambda net, x, y: al.fmn(net, x, y, norm=p, steps=steps))
    if norm in ("l2", "linf"):
        df_fb = fb.attacks.L2DeepFoolAttack if norm == "l2" else fb.attacks.LinfDeepFoolAttack
        ours(f"DeepFool-{df_steps}", advx.DeepFool(threat, steps=df_steps))
        foolbox(f"DeepFool-{df_steps}", df_fb(steps=df_steps))
        adv_lib(f"DeepFool-{df_steps}", lambda net, x, y: al.df(net, x, y, steps=df_steps, norm=p))
    return out


def run_model(label: str, net, x, y, args) -> tuple[str, dict]:
    lines = []
    facts: dict = {}
    for norm in args.norms:
        runs = []
        for name, lib, run in attacks_for(norm, args.steps, args.df_steps):
            if name.split("-")[0] not in args.attacks:
                continue
            torch.manual_seed(0)
            t0 = time.perf_counter()
            x_adv, r = run(net, x, y)
            secs = time.perf_counter() - t0
            d = distances(net, x_adv, x, y, norm)
            runs.append((name, lib, d, secs, r))
            print(f"  {label} {norm} {lib} {name}: {secs:.1f}s", file=sys.stderr, flush=True)
        ref = torch.stack([d for _, _, d, _, _ in runs]).amin(dim=0)  # (N,) best of all
        rows = []
        for name, lib, d, secs, r in runs:
            ok = torch.isfinite(d)
            opt = torch.where(ok, ref / d.clamp(min=1e-12), torch.zeros_like(d))
            extra = ""
            if r is not None and "iterations" in r.trace:
                it = r.trace["iterations"]
                extra = (
                    f"iterations: median {float(it[it >= 0].float().median()):.0f}, "
                    f"<= 3 for {float(((it >= 0) & (it <= 3)).float().mean()):.0%}"
                )
            rows.append(
                [lib, name, f"{float(ok.float().mean()):.1%}", float(d.median()),
                 float(opt.mean()), secs, extra]
            )  # fmt: skip
            facts[(norm, lib, name)] = d
        lines.append(f"**{label}, {norm.upper()}** (n = {len(x)})\n")
        lines.append(
            table(
                [
                    "library",
                    "attack",
                    "success",
                    "median distance (failures inf)",
                    "optimality",
                    "seconds",
                    "",
                ],
                rows,
            )  # fmt: skip
        )
        lines.append("")
    return "\n".join(lines), facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--df-steps", type=int, default=50)
    ap.add_argument("--norms", nargs="+", default=["l2", "linf", "l1"])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["smallcnn", "lenet"],
        choices=["smallcnn", "lenet", "resnet20"],
    )
    ap.add_argument("--cache", type=Path, default=None, help="where to keep the LeNet's weights")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--attacks", nargs="+", default=["DDN", "FMN", "DeepFool"], help="which families to run"
    )
    ap.add_argument("--write", action="store_true", help="print the RESULTS.md section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    parts = []
    for m in args.models:
        if m == "resnet20":
            # the class-balanced CIFAR-10 test points (every k-th of the class-sorted set), as
            # the audit benchmarks take them; twice n, then the first n classified correctly
            xs, ys = cifar_balanced(min(2 * args.n, 10000))
            net = resnet20_normalized()
        else:
            xs, ys = mnist_test(max(args.n * 2, 200))
            net = trades_smallcnn() if m == "smallcnn" else undefended_lenet(args.cache)
        for prm in net.parameters():
            prm.requires_grad_(False)
        with torch.no_grad():
            ok = net(xs).argmax(1) == ys
        x, y = xs[ok][: args.n].clone(), ys[ok][: args.n].clone()
        advx.DDN(steps=2)(wrapper(net), x, y)  # warm-up: advx sizes its chunks once
        label = {
            "smallcnn": "TRADES SmallCNN",
            "lenet": "undefended LeNet",
            "resnet20": "CIFAR-10 ResNet-20 (undefended)",
        }[m]
        text, facts = run_model(label, net, x, y, args)
        parts.append(text)
        if m == "smallcnn" and "linf" in args.norms and "FMN" in args.attacks:
            t0 = time.perf_counter()
            apgd = advx.APGD(advx.Linf(0.3), steps=100)(wrapper(net), x, y)
            secs = time.perf_counter() - t0
            fmn = facts[("linf", "advx", f"FMN-{args.steps}")]
            parts.append(
                f"Robust accuracy at Linf 0.3 on these points: implied by advx FMN-Linf-"
                f"{args.steps} {float((fmn > 0.3 + 1e-6).float().mean()):.1%}; APGD-CE 100 steps "
                f"{apgd.robust_accuracy:.1%} ({secs:.1f}s).\n"
            )
    print("\n".join(parts))
    print(
        f"Command: `python benchmarks/bench_minnorm.py --n {args.n} --steps {args.steps} "
        f"--df-steps {args.df_steps} --norms {' '.join(args.norms)} --models "
        f"{' '.join(args.models)} --threads {args.threads} --attacks {' '.join(args.attacks)}`; "
        f"{machine()}; "
        f"{versions('foolbox', 'adv_lib')}"
    )


if __name__ == "__main__":
    main()
