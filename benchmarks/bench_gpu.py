"""The GPU paths, on a lent GPU: mixed precision, torch.compile, the audit next to torchattacks'
AutoAttack, and training -- each checked against fp32 / eager and timed.

    python benchmarks/bench_gpu.py --n 1000 --out results/ [--deadline 420]

Parts (each skipped, and said so, once --deadline seconds have passed):

* precision: PGD-40 (step 0.01) and APGD-CE on the TRADES SmallCNN (MNIST, Linf 0.3) with the
  Classifier in fp32, under bf16 and under fp16 autocast, and fp32 on this machine's CPU: robust
  accuracy, how many per-sample verdicts differ from the fp32 GPU run, median seconds.
* audit: torchattacks' AutoAttack (version="standard") and advx's `standard` and `fast` suites
  (and `fast` with compile=True) on the same points, robust accuracy and seconds.
* train: one FGSM-RS epoch of advx.training.fit on the full MNIST training set (WongCNN): fp32,
  bf16 autocast and compile=True; seconds per epoch and the monitor's clean / PGD accuracy.

Writes gpu.json and gpu.md under --out; prints the markdown too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _common import (
    SHARED,
    advx,
    cifar_balanced,
    mnist_test,
    resnet20_normalized,
    table,
    trades_smallcnn,
    versions,
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default="gpu-results")
    ap.add_argument(
        "--deadline", type=float, default=420.0, help="seconds; later parts are skipped after it"
    )
    ap.add_argument(
        "--parts", default="precision,audit,train", help="also: profile (cProfile of advx standard)"
    )
    ap.add_argument(
        "--train-n", type=int, default=None, help="training samples (default: all 60,000)"
    )
    ap.add_argument(
        "--audit-variants",
        default="standard,fast,fast-compile,standard-bf16",
        help="also: ta100 (torchattacks' attacks as fra31/auto-attack's cascade, 100 steps), "
        "standard-eager and fast-eager (compaction every step, targets one at a time: issue "
        "15's items 3 and 4 off)",
    )
    ap.add_argument(
        "--model", choices=["trades", "resnet20"], default="trades", help="the audit's model"
    )
    args = ap.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "versions": versions("torchattacks"),
        "n": args.n,
    }
    results: dict = {"info": info}
    md: list[str] = [f"Device: {info['device']}; {info['versions']}", ""]

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gpu.md").write_text("\n".join(md) + "\n")

    def late(part: str) -> bool:
        if time.perf_counter() - start > args.deadline:
            md.append(f"({part}: skipped, past the {args.deadline:.0f} s deadline)")
            save()
            return True
        return False

    net = trades_smallcnn().to(dev)
    x, y = mnist_test(args.n)
    x, y = x.to(dev), y.to(dev)
    parts = args.parts.split(",")

    if "precision" in parts and not late("precision"):
        rows, ref = [], {}
        cpu_net = trades_smallcnn()
        configs = [
            ("fp32", dev, None),
            ("bf16 autocast", dev, torch.bfloat16),
            ("fp16 autocast", dev, torch.float16),
            ("fp32 on the CPU", torch.device("cpu"), None),
        ]
        for attack_name, attack in (
            ("PGD-40", advx.PGD(advx.Linf(0.3), steps=40, step_size=0.01)),
            ("APGD-CE", advx.APGD(advx.Linf(0.3), steps=100)),
        ):
            for label, d, ac in configs:
                if d.type == "cpu" and dev.type == "cpu" and label != "fp32":
                    continue
                clf = advx.Classifier(net if d == dev else cpu_net, autocast=ac)
                xd, yd = x.to(d), y.to(d)
                attack(clf, xd[:200], yd[:200])  # warm-up: kernels and chunk sizes
                secs, r = timed(
                    lambda attack=attack, clf=clf, xd=xd, yd=yd: attack(clf, xd, yd),
                    repeats=1 if d.type == "cpu" else 3,
                )
                ok = r.success.cpu()
                ref.setdefault(attack_name, ok)
                rows.append(
                    [
                        attack_name,
                        label,
                        f"{1 - r.success_rate:.2%}",
                        int((ok != ref[attack_name]).sum()),
                        secs,
                    ]
                )
                results.setdefault("precision", []).append(
                    {
                        "attack": attack_name,
                        "config": label,
                        "robust": 1 - r.success_rate,
                        "seconds": secs,
                    }
                )
        md += [
            "### Precision (TRADES SmallCNN, MNIST, Linf 0.3)",
            "",
            table(
                [
                    "attack",
                    "classifier",
                    "robust accuracy",
                    "verdicts differing from fp32 GPU",
                    "seconds",
                ],
                rows,
            ),
            "",
        ]
        save()

    if "audit" in parts and not late("audit"):
        rows, stages = [], []
        if args.model == "resnet20":
            a_net, eps, what = resnet20_normalized().to(dev), 8 / 255, "CIFAR-10 ResNet-20"
            a_x, a_y = (t.to(dev) for t in cifar_balanced(args.n))
        else:
            a_net, eps, what = net, 0.3, "MNIST TRADES SmallCNN"
            a_x, a_y = x, y
        try:
            import torchattacks

            atk = torchattacks.AutoAttack(
                a_net, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0
            )
            secs, xa = timed(lambda: atk(a_x, a_y))
            with torch.no_grad():
                acc = float((a_net(xa).argmax(1) == a_y).float().mean())
            rows.append(["torchattacks AutoAttack (standard)", f"{acc:.2%}", secs, 1.0])
            ta = secs
        except ImportError as e:
            rows.append([f"torchattacks not importable ({e})", "-", "-", "-"])
            ta = None
        # (label, suite, Classifier keywords, environment: issue 15's settings)
        eager = {"ADVX_COMPACT_EVERY": "1", "ADVX_RUNS_AT_ONCE": "1"}
        variants = {
            "standard": ("advx standard", "standard", {}, {}),
            "fast": ("advx fast", "fast", {}, {}),
            "fast-compile": ("advx fast, compile=True", "fast", {"compile": True}, {}),
            "standard-bf16": (
                "advx standard, bf16 autocast",
                "standard",
                {"autocast": torch.bfloat16},
                {},
            ),
            "standard-eager": (
                "advx standard, compact every step, targets in turn",
                "standard",
                {},
                eager,
            ),
            "fast-eager": ("advx fast, compact every step, targets in turn", "fast", {}, eager),
        }
        names = args.audit_variants.split(",")
        if "ta100" in names and not late("ta100"):
            from bench_audit import run_torchattacks

            sync()
            peer = run_torchattacks(a_net, a_x, a_y, eps, steps=100)
            sync()
            rows.append(
                [
                    "torchattacks APGD-CE, APGD-T, FAB-T (100 steps), Square 5000",
                    f"{peer['robust']:.2%}",
                    peer["seconds"],
                    peer["seconds"] / ta if ta else "-",
                ]
            )
            results.setdefault("audit", []).append({"label": "ta100", **peer})
            save()
        for label, suite, kw, env in (variants[v] for v in names if v != "ta100"):
            if late(label):
                break
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            clf = advx.Classifier(a_net, **kw)
            advx.PGD(advx.Linf(eps), steps=1)(clf, a_x[:200], a_y[:200])  # chunk sizes
            secs, rep = timed(
                lambda clf=clf, suite=suite: advx.audit(
                    clf, a_x, a_y, advx.Linf(eps), suite=suite, eps_curve=None, checks=False
                )
            )
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            rows.append([label, f"{rep.robust_accuracy:.2%}", secs, secs / ta if ta else "-"])
            stages.append(
                f"- {label}: "
                + "; ".join(
                    f"{c.attack} {c.params.get('loss', '')} broke {c.broke}"
                    f" in {c.seconds:.1f} s" + (f" (on {c.gate.attacked})" if c.gate else "")
                    for c in rep.cascade
                )
            )
            results.setdefault("audit", []).append(
                {
                    "label": label,
                    "robust": rep.robust_accuracy,
                    "seconds": secs,
                    "fwd": rep.totals.queries,
                    "bwd": rep.totals.grads,
                }
            )
            save()
        md += [
            f"### Audit, {args.n} test images, {what}, Linf {eps:.4g}",
            "",
            table(["evaluation", "robust accuracy", "seconds", "ratio to torchattacks"], rows),
            "",
            "Per stage:",
            "",
            *stages,
            "",
        ]
        save()

    if "profile" in parts and not late("profile"):
        import cProfile
        import io
        import pstats

        clf = advx.Classifier(net)
        advx.PGD(advx.Linf(0.3), steps=1)(clf, x[:200], y[:200])
        prof = cProfile.Profile()
        prof.enable()
        advx.audit(clf, x, y, advx.Linf(0.3), suite="standard", eps_curve=None, checks=False)
        sync()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        (out / "profile.txt").write_text(buf.getvalue())
        md += ["(profile of advx standard: profile.txt)", ""]
        save()

    if "train" in parts and not late("train"):
        from advx.training import Precision, Schedule, fgsm_rs, fit

        xt, yt = advx.data.load(SHARED / "data" / "mnist", split="train", n=args.train_n)
        rows = []
        for label, precision in (
            ("fp32", Precision()),
            ("bf16 autocast", Precision(autocast=torch.bfloat16)),
            ("compile=True", Precision(compile=True)),
        ):
            if late(f"train {label}"):
                break
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(0)
                wnet = advx.zoo.build("wong_cnn").to(dev)
            secs, h = timed(
                lambda wnet=wnet, precision=precision: fit(
                    wnet,
                    xt,
                    yt,
                    loss=fgsm_rs(0.3, alpha=0.375),
                    schedule=Schedule(epochs=2, lr=5e-3, lr_schedule="cyclic"),
                    batch_size=100,
                    precision=precision,
                    progress=False,
                )
            )
            e = h.epochs
            rows.append(
                [
                    label,
                    e[0]["seconds"],
                    e[1]["seconds"],
                    f"{e[1]['monitor_clean_accuracy']:.1%}",
                    f"{e[1]['monitor_adv_accuracy']:.1%}",
                ]
            )
            results.setdefault("train", []).append({"label": label, "epochs": e})
            save()
        md += [
            "### Training: FGSM-RS, WongCNN, MNIST training set,"
            " 2 epochs of a 2-epoch cyclic schedule",
            "",
            table(
                [
                    "fit",
                    "epoch 1 s (incl. compile)",
                    "epoch 2 s",
                    "monitor clean",
                    "monitor PGD-10",
                ],
                rows,
            ),
            "",
        ]
        save()

    md.append(f"total {time.perf_counter() - start:.0f} s")
    save()
    print("\n".join(md))


if __name__ == "__main__":
    main()
