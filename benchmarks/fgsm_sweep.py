"""FGSM-RS across seeds, step sizes and epochs: how stable is Wong et al.'s recipe on MNIST?

    python benchmarks/fgsm_sweep.py --variants 1:0.375:10,2:0.375:10,0:0.3:10 --n 500

Each variant (seed:alpha:epochs) trains the WongCNN on the full MNIST training set with
``advx.training.fit`` (batch 100, Adam, cyclic lr up to 5e-3, Linf 0.3) and audits it with the
``fast`` suite on the first --n test images; one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import SHARED, advx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", required=True, help="seed:alpha:epochs[:warmup], comma-separated")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from advx.training import Schedule, fgsm_rs, fit

    x, y = advx.data.load(SHARED / "data" / "mnist", split="train")
    xt, yt = advx.data.load(SHARED / "data" / "mnist", split="test", n=args.n)
    for spec in args.variants.split(","):
        seed, alpha, epochs, *rest = spec.split(":")
        seed, alpha, epochs, warmup = (
            int(seed),
            float(alpha),
            int(epochs),
            int(rest[0]) if rest else 0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = advx.zoo.build("wong_cnn")
        t0 = time.perf_counter()
        h = fit(
            net,
            x,
            y,
            loss=fgsm_rs(0.3, alpha=alpha, warmup=warmup),
            schedule=Schedule(epochs=epochs, lr=5e-3, lr_schedule="cyclic"),
            batch_size=100,
            seed=seed,
            progress=False,
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = advx.audit(
            advx.Classifier(net.eval()),
            xt,
            yt,
            advx.Linf(0.3),
            suite="fast",
            eps_curve=None,
            checks=False,
        )
        print(
            json.dumps(
                {
                    "seed": seed,
                    "alpha": alpha,
                    "epochs": epochs,
                    "warmup": warmup,
                    "train_s": round(train_s),
                    "audit_s": round(time.perf_counter() - t0),
                    "stopped": h.stopped,
                    "mon": [
                        (e.get("monitor_clean_accuracy"), e.get("monitor_adv_accuracy"))
                        for e in h.epochs
                    ],
                    "clean": rep.clean_accuracy,
                    "robust": rep.robust_accuracy,
                    "cascade": [(c.attack, c.broke) for c in rep.cascade],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
