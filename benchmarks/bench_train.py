"""Hardening benchmarks: adversarial training on MNIST, defensive distillation, DDP.

    python benchmarks/bench_train.py fgsm-rs --epochs 10 --out runs/fgsm       # (a) Wong et al.
    python benchmarks/bench_train.py overhead --batches 300          # (a) fit vs a plain loop
    python benchmarks/bench_train.py trades --epochs 3 --out runs/trades       # (b)
    python benchmarks/bench_train.py pgd-at --epochs 3 --out runs/pgd          # (b)
    python benchmarks/bench_train.py distillation --out runs/distill           # (c) Papernot et al.
    python benchmarks/bench_train.py ddp --n 12000                   # (d) 2 processes vs 1

(a)/(b) train the small CNN of Wong, Rice & Kolter (2020) on the full MNIST training set
(../shared/data/mnist) at Linf eps 0.3 and audit it on the first 1,000 test images with
``advx.audit`` (suite ``standard`` unless --audit-suite says otherwise; --audit-n 0 skips it).
``overhead`` times ``advx.training.fit`` against a plain PyTorch loop that does the same work
(FGSM-RS, Adam, cyclic lr, the same batches) on the same data, interleaved.
``ddp`` trains the same FGSM-RS epochs in one process and under ``torchrun`` with two (gloo),
compares the weights and reports the speed ratio.

These machines have 2 CPU cores shared with other jobs: times are pessimistic and noisy, and
torch runs with one thread per process (--threads) because two spinning OpenMP threads on a
loaded 2-core machine are many times slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ROOT, SHARED, advx, machine, table, versions

MNIST = SHARED / "data" / "mnist"
PUBLISHED = {  # TRADES SmallCNN of ../shared/models, full MNIST test set, Linf 0.3
    "clean": 0.9948,
    "autoattack": 0.9281,
}


def mnist(split: str, n: int | None = None):
    return advx.data.load(MNIST, split=split, n=n)


def wong_cnn(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return advx.zoo.build("wong_cnn")


def audit(net, suite: str, n: int, seed: int, eps_curve) -> dict:
    x, y = mnist("test", n)
    t0 = time.perf_counter()
    report = advx.audit(
        advx.Classifier(net.eval()),
        x,
        y,
        advx.Linf(0.3),
        suite=suite,
        seed=seed,
        eps_curve=eps_curve,
    )
    return {
        "clean": report.clean_accuracy,
        "robust": report.robust_accuracy,
        "reliable": report.reliable,
        "findings": [f.code for f in report.findings],
        "cascade": [(c.attack, c.broke) for c in report.cascade],
        "seconds": round(time.perf_counter() - t0, 1),
        "report": report,
    }


# ---- (a), (b): adversarial training on MNIST -------------------------------------------------
def train_mnist(args) -> None:
    from advx.training import Checkpointing, Schedule, fgsm_rs, fit, pgd_at, trades

    x, y = mnist("train")
    recipe = {
        "fgsm-rs": lambda: fgsm_rs(0.3, alpha=args.alpha, warmup=args.warmup),
        "pgd-at": lambda: pgd_at(
            0.3, steps=args.steps, step_size=0.01 if args.steps >= 40 else None, warmup=args.warmup
        ),
        "trades": lambda: trades(0.3, beta=6.0, steps=args.steps),
    }[args.cmd]()
    net = wong_cnn(args.seed)
    print(
        f"{args.cmd}: {recipe.params}, {len(x):,} samples, {args.epochs} epochs, "
        f"batch {args.batch_size}, "
        f"Adam, lr {args.lr} ({args.lr_schedule}); {machine()}",
        file=sys.stderr,
    )
    h = fit(
        net,
        x,
        y,
        loss=recipe,
        schedule=Schedule(epochs=args.epochs, lr=args.lr, lr_schedule=args.lr_schedule),
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=None
        if args.out is None
        else Checkpointing(args.out, resume=True, data_name="mnist:train"),
    )
    per_epoch = [e["seconds"] for e in h.epochs]
    print(json.dumps({"history": h.to_dict()}, indent=1), file=sys.stderr)
    rows = [
        [
            e["epoch"],
            f"{e['lr']:.4g}",
            f"{e['loss']:.4f}",
            _pct(e["train_adv_accuracy"]),
            _pct(e.get("monitor_clean_accuracy")),
            _pct(e.get("monitor_adv_accuracy")),
            e["seconds"],
        ]
        for e in h.epochs
    ]
    print(
        table(
            ["epoch", "lr", "loss", "train adv acc", "monitor clean", "monitor PGD-10", "seconds"],
            rows,
        )
    )
    print(
        f"\ntraining: {sum(per_epoch):.0f}s in all "
        f"({statistics.median(per_epoch):.1f}s per epoch, median; "
        f"{h.seconds:.0f}s with the per-epoch monitor and checkpoints)"
        f"{'; stopped: ' + h.stopped if h.stopped else ''}"
    )
    if args.audit_n:
        a = audit(
            net,
            args.audit_suite,
            args.audit_n,
            args.seed,
            None if args.eps_curve == "none" else "auto",
        )
        if args.out:
            a["report"].save(Path(args.out) / "report.json")
        print(
            f"\naudit ({args.audit_suite}, first {args.audit_n} MNIST test images, Linf 0.3): "
            f"clean {a['clean']:.2%}, robust {a['robust']:.2%}, reliable {a['reliable']}, "
            f"findings {a['findings']}, cascade {a['cascade']}, "
            f"{a['seconds']:.0f}s"
        )
        print(
            table(
                ["model", "training", "clean", "robust (suite)"],
                [
                    [
                        f"WongCNN ({args.cmd}, {len(h.epochs)} epochs)",
                        f"{sum(per_epoch) / 60:.1f} min, 1 CPU thread",
                        f"{a['clean']:.2%}",
                        f"{a['robust']:.2%} ({args.audit_suite}, n={args.audit_n})",
                    ],
                    [
                        "TRADES SmallCNN (published)",
                        "-",
                        f"{PUBLISHED['clean']:.2%}",
                        f"{PUBLISHED['autoattack']:.2%} (AutoAttack, n=10000)",
                    ],
                ],
            )
        )
    print(json.dumps(versions()))


def _pct(v):
    return "-" if v is None else f"{v:.1%}"


# ---- (a) overhead against a plain loop ------------------------------------------------------
def plain_fgsm_rs(
    net, x, y, *, batches: int, batch_size: int, lr: float, epochs: int, seed: int
) -> float:
    """What a user writes by hand: FGSM-RS (Wong et al.) with Adam and the cyclic schedule."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    eps, alpha = 0.3, 0.375
    steps = -(-x.shape[0] // batch_size)
    net.train()
    t0 = time.perf_counter()
    for t in range(batches):
        idx = order[t * batch_size : (t + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        frac = (t + 1) / steps
        peak = 0.4 * epochs
        rate = lr * frac / peak if frac <= peak else lr * (epochs - frac) / (epochs - peak)
        for group in opt.param_groups:
            group["lr"] = rate
        delta = (torch.rand_like(xb) * 2 - 1) * eps
        delta = ((xb + delta).clamp(0, 1) - xb).requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(xb + delta), yb), delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        x_adv = (xb + delta).clamp(0, 1)
        loss = F.cross_entropy(net(x_adv), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())  # a user logs the loss: one sync per batch, as fit does
    return time.perf_counter() - t0


def overhead(args) -> None:
    from advx.training import Monitor, Schedule, fgsm_rs, fit

    x, y = mnist("train")
    n = args.batches * args.batch_size
    unwatched = Monitor(data=None, overfit_check=False)
    xs, ys = x[:n], y[:n]
    ours, theirs = [], []
    plain_fgsm_rs(
        wong_cnn(0), xs, ys, batches=5, batch_size=args.batch_size, lr=5e-3, epochs=10, seed=0
    )  # warm-up
    fit(
        wong_cnn(0),
        xs[:500],
        ys[:500],
        loss=fgsm_rs(0.3),
        batch_size=args.batch_size,
        progress=False,
        monitor=unwatched,
    )
    for r in range(args.repeats):  # interleaved, so that load drifts hit both alike
        theirs.append(
            plain_fgsm_rs(
                wong_cnn(r),
                xs,
                ys,
                batches=args.batches,
                batch_size=args.batch_size,
                lr=5e-3,
                epochs=10,
                seed=r,
            )
        )
        h = fit(
            wong_cnn(r),
            xs,
            ys,
            loss=fgsm_rs(0.3, alpha=0.375),
            schedule=Schedule(lr=5e-3, lr_schedule="cyclic"),
            batch_size=args.batch_size,
            seed=r,
            progress=False,
            monitor=unwatched,
        )
        ours.append(h.epochs[0]["seconds"])
    a, b = statistics.median(ours), statistics.median(theirs)
    full = 60000 / n
    print(
        table(
            [
                "loop",
                f"seconds for {args.batches} batches of {args.batch_size} "
                f"(median of {args.repeats})",
                "per 60k-sample epoch",
                "ratio",
            ],
            [
                [
                    "advx.training.fit (FGSM-RS)",
                    f"{a:.2f} {sorted(round(v, 2) for v in ours)}",
                    f"{a * full:.0f}s",
                    f"{a / b:.3f}",
                ],
                [
                    "plain PyTorch loop",
                    f"{b:.2f} {sorted(round(v, 2) for v in theirs)}",
                    f"{b * full:.0f}s",
                    "1",
                ],
            ],
        )
    )
    print(machine())


# ---- (c) defensive distillation --------------------------------------------------------------
def distillation(args) -> None:
    from advx.training import Schedule, fit, standard
    from advx.training import distillation as distill

    T = args.temperature
    x, y = advx.data.load("mnist-demo", split="train")
    xt, yt = advx.data.load("mnist-demo", split="test", n=args.n)
    kw = dict(
        schedule=Schedule(epochs=args.epochs, lr=1e-3), batch_size=64, seed=args.seed, progress=True
    )
    teacher = advx.zoo.build("lenet")
    t0 = time.perf_counter()
    fit(teacher, x, y, loss=standard(temperature=T), **kw)
    student = advx.zoo.build("lenet")
    fit(student, x, y, loss=distill(advx.Classifier(teacher.eval()), temperature=T), **kw)
    baseline = advx.zoo.build("lenet")
    fit(baseline, x, y, **kw)
    train_s = time.perf_counter() - t0
    rows = []
    for name, net in (("undefended LeNet", baseline), (f"distilled LeNet (T={T:g})", student)):
        clf = advx.Classifier(net.eval())
        ok = clf.predict(xt) == yt
        xs, ys = xt[ok], yt[ok]
        pgd = advx.PGD(advx.Linf(0.3), steps=40, seed=args.seed)(clf, xs, ys)
        pgd_m = advx.PGD(advx.Linf(0.3), steps=40, loss="margin", seed=args.seed)(clf, xs, ys)
        cw = advx.CW(
            advx.L2(float("inf")), steps=200, search_steps=6, initial_c=0.1, lr=0.05, seed=args.seed
        )(clf, xs, ys)
        rows.append(
            [
                name,
                f"{float(ok.float().mean()):.1%}",
                f"{pgd.success_rate:.1%}",
                f"{pgd_m.success_rate:.1%}",
                f"{cw.success_rate:.1%}",
                f"{float(cw.distance[cw.success].median()):.2f}",
            ]
        )
    print(
        table(
            [
                "model",
                "clean",
                "PGD-40 CE Linf 0.3 success",
                "PGD-40 margin success",
                "CW-L2 success",
                "CW median L2",
            ],
            rows,
        )
    )
    rep = advx.audit(
        advx.Classifier(student.eval()),
        xt,
        yt,
        advx.Linf(0.3),
        suite=args.audit_suite,
        seed=args.seed,
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        rep.save(Path(args.out) / "report.json")
    print(
        f"\naudit of the distilled model ({args.audit_suite}, n={len(xt)}): "
        f"clean {rep.clean_accuracy:.1%}, robust "
        f"{rep.robust_accuracy:.1%}, reliable {rep.reliable}"
    )
    for f in rep.findings:
        print(f"- {f.severity} {f.code}: {f.message}")
    print(f"(training the three models: {train_s:.0f}s)")


# ---- (d) DDP: 2 processes vs 1 --------------------------------------------------------------
_DDP_SCRIPT = """
import sys, time, torch, advx
from advx.training import Monitor, Schedule, fit, fgsm_rs
from advx.training.distributed import init_from_env
torch.set_num_threads(int(sys.argv[3]))
g = init_from_env("cpu")
x, y = advx.data.load(sys.argv[1], split="train", n=int(sys.argv[2]))
seed = int(sys.argv[5])
torch.manual_seed(seed)
net = advx.zoo.build("wong_cnn")
h = fit(net, x, y, loss=fgsm_rs(0.3, alpha=0.375), batch_size=100, seed=seed, progress=False,
        schedule=Schedule(epochs=2, lr=5e-3, lr_schedule="cyclic"),
        monitor=Monitor(data=None, overfit_check=False))
if g.rank == 0:
    torch.save(net.state_dict(), sys.argv[4])
    print("EPOCHS", sum(e["seconds"] for e in h.epochs))
"""


def ddp(args) -> None:
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_fit.py"
        script.write_text(_DDP_SCRIPT)
        env = {
            **os.environ,
            "ADVX_PROGRESS": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT / "src"),
        }
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ]
        runs = [
            ("1 process, 1 thread", [sys.executable, str(script)], 1, 0),
            ("1 process, 2 threads", [sys.executable, str(script)], 2, 0),
            ("2 processes (torchrun, gloo), 1 thread each", torchrun, 1, 0),
            (
                "1 process, 1 thread, another seed (the spread between seeds)",
                [sys.executable, str(script)],
                1,
                1,
            ),
        ]
        for label, cmd, threads, seed in runs:
            times = []
            for r in range(args.repeats):
                out = Path(tmp) / f"{len(results)}-{r}.pt"
                proc = subprocess.run(
                    [*cmd, str(MNIST), str(args.n), str(threads), str(out), str(seed)],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=tmp,
                    timeout=3600,
                )
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                times.append(float(proc.stdout.split("EPOCHS")[1].split()[0]))
            results[label] = (statistics.median(times), torch.load(out))
            rows.append(
                [label, f"{statistics.median(times):.1f}", sorted(round(t, 1) for t in times)]
            )
    base_t, base_w = results["1 process, 1 thread"]
    xt, yt = advx.data.load(str(MNIST), split="test", n=1000)
    for row in rows:
        t, w = results[row[0]]
        net = advx.zoo.build("wong_cnn")
        net.load_state_dict(w)
        clf = advx.Classifier(net.eval())
        clean = float((clf.predict(xt) == yt).float().mean())
        pgd = advx.PGD(advx.Linf(0.3), steps=20, seed=0)(clf, xt, yt)
        row += [
            f"{base_t / t:.2f}x",
            f"{max(float((w[k] - base_w[k]).abs().max()) for k in w):.2e}",
            f"{clean:.1%}",
            f"{1 - pgd.success_rate:.1%}",
        ]
    print(
        table(
            [
                "run",
                f"seconds, 2 epochs of FGSM-RS on {args.n:,} MNIST samples (median)",
                "all runs",
                "speed vs 1 process",
                "max |weight difference| vs 1 process",
                "clean (1,000 test)",
                "PGD-20 Linf 0.3",
            ],
            rows,
        )
    )
    print(
        "\nThe weights drift apart over hundreds of steps because a different reduction order "
        "(threads, or the all-reduce) changes the last bits of a gradient and FGSM's sign step "
        "amplifies it; the test"
        " (tests/training) checks a few steps against one process within floating-point tolerance."
    )
    print(machine())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "cmd", choices=["fgsm-rs", "pgd-at", "trades", "overhead", "distillation", "ddp"]
    )
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--lr-schedule", default="cyclic")
    ap.add_argument("--steps", type=int, default=10, help="PGD-AT / TRADES inner steps")
    ap.add_argument(
        "--alpha", type=float, default=0.375, help="FGSM-RS step (Wong et al.: 1.25 eps = 0.375)"
    )
    ap.add_argument(
        "--warmup", type=int, default=0, help="PGD-AT, FGSM-RS: epochs of linearly growing eps"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="checkpoint folder (resumed from when it exists)")
    ap.add_argument("--audit-n", type=int, default=1000)
    ap.add_argument("--audit-suite", default="standard")
    ap.add_argument("--eps-curve", default="none")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=300, help="overhead: batches per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--n", type=int, default=None, help="ddp: training samples; distillation: test samples"
    )
    ap.add_argument("--temperature", type=float, default=100.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cmd in ("fgsm-rs", "pgd-at", "trades"):
        args.epochs = args.epochs or 10
        train_mnist(args)
    elif args.cmd == "overhead":
        overhead(args)
    elif args.cmd == "distillation":
        args.epochs = args.epochs or 5
        args.n = args.n or 500
        if args.audit_suite == "standard":
            args.audit_suite = "fast"
        distillation(args)
    else:
        args.n = args.n or 12000
        ddp(args)


if __name__ == "__main__":
    main()
