"""The demo: train a small CNN on the embedded MNIST slice, attack it, write what happened.

Everything runs offline on the embedded data in well under a minute on two CPU cores.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import attacks
from ._io import atomic_open, write_json
from ._version import __version__
from .data import data_sha256, load
from .models import Classifier
from .threat import L2, Linf
from .training import fit
from .zoo import nets

__all__ = ["run_demo", "format_table"]

LINF_EPS = (0.05, 0.1, 0.2, 0.3)
L2_EPS = (0.5, 1.0, 1.5, 2.0)
CW_SAMPLES = 200


def run_demo(out: str | Path = "advx-demo", *, n: int = 500, epochs: int = 4, seed: int = 0,
             echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train, attack with FGSM, PGD and CW, and write ``summary.json`` and ``examples.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x_train, y_train = load("mnist-demo", split="train")
    x, y = load("mnist-demo", split="test", n=n)

    echo(f"training a LeNet on {len(x_train):,} embedded MNIST digits ({epochs} epochs)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nets.lenet()
    history = fit(net, x_train, y_train, epochs=epochs, batch_size=64, lr=2e-3, seed=seed, desc="train")
    model = Classifier(net.eval())
    clean = model.predict(x) == y
    clean_acc = float(clean.float().mean())
    echo(f"clean accuracy on {n} held-out digits: {clean_acc:.1%}  (trained in {history.seconds:.1f}s)")

    rows: list[dict[str, Any]] = []
    keep: dict[str, Any] = {}
    for name, make in (("fgsm", lambda e: attacks.FGSM(Linf(e), seed=seed)),
                       ("pgd", lambda e: attacks.PGD(Linf(e), steps=40, seed=seed))):
        for eps in LINF_EPS:
            echo(f"{name} at Linf eps {eps}")
            r = make(eps)(model, x, y)
            rows.append(_row(name, f"linf:{eps:g}", r.success, r.distance, r, clean_acc))
            if name == "pgd" and eps == 0.2:
                keep["pgd"] = r
    # CW runs many more passes per sample than PGD: a 200-sample subset keeps the demo short
    m = min(n, CW_SAMPLES)
    echo(f"cw (minimum-norm L2) on the first {m} digits")
    cw = attacks.CW(L2(float("inf")), steps=100, search_steps=4, initial_c=1.0, lr=0.05, seed=seed)(model, x[:m], y[:m])
    keep["cw"] = cw
    for eps in L2_EPS:
        ok = cw.success & (cw.distance <= eps + 1e-6)
        rows.append(_row("cw", f"l2:{eps:g}", ok, cw.distance, cw, float(clean[:m].float().mean())))

    files = {"summary": str(out / "summary.json")}
    picture = _grid(x, y, model, keep)
    if picture is not None:
        with atomic_open(out / "examples.png", "wb") as f:
            f.write(picture)
        files["examples"] = str(out / "examples.png")
    else:
        echo("matplotlib is not installed: no examples.png (pip install 'advx[report]')")

    summary = {
        "advx_demo": 1,
        "clean_accuracy": clean_acc,
        "n": n,
        "rows": rows,
        "cw": {k: v for k, v in cw.summary().items() if k in ("median_distance", "mean_distance", "success_rate", "queries", "grads", "seconds")},
        "training": {"model": "lenet", "data": "mnist-demo:train", "samples": len(x_train), "epochs": history.epochs, "seconds": round(history.seconds, 2)},
        "files": files,
        "seconds": round(time.perf_counter() - start, 2),
        "provenance": {"advx": __version__, "torch": torch.__version__, "python": platform.python_version(),
                       "device": "cpu", "seed": seed, "data": "mnist-demo:test", "data_sha256": data_sha256(x, y)},
    }
    write_json(out / "summary.json", summary)
    return summary


def _row(attack: str, threat: str, success, distance, result, clean_acc: float) -> dict[str, Any]:
    ok = success
    d = distance[ok]
    return {
        "attack": attack,
        "threat": threat,
        "n": len(success),
        "clean_accuracy": clean_acc,
        "robust_accuracy": float((~ok).float().mean()),
        "median_perturbation": float(d.median()) if d.numel() else None,
        "queries": int(result.queries.sum()),
        "grads": int(result.grads.sum()),
        "seconds": round(result.seconds, 3),
    }


def _grid(x, y, model: Classifier, keep: dict) -> bytes | None:
    from .viz import example_grid, have_matplotlib

    if not have_matplotlib():
        return None
    pgd, cw = keep["pgd"], keep["cw"]
    m = len(cw)
    pick = (pgd.success[:m] & cw.success).nonzero().view(-1)[:6]
    if pick.numel() == 0:
        pick = torch.arange(min(6, len(x)))
    columns = []
    for title, r in (("PGD Linf 0.2", pgd), ("CW L2 min-norm", cw)):
        pred = model.predict(r.x_adv[pick])
        captions = [f"-> {int(p)}  ({r.threat.norm} {float(d):.2f})" for p, d in zip(pred, r.distance[pick])]
        columns.append((title, r.x_adv[pick], captions))
    return example_grid(x[pick], columns, row_labels=[f"label {int(v)}" for v in y[pick]])


def format_table(summary: dict[str, Any]) -> str:
    """The demo's results as a plain-text table."""
    lines = [f"{'attack':<8}{'threat':<12}{'n':>5}{'clean acc':>10}{'robust acc':>12}{'median pert.':>14}{'time':>8}"]
    for r in summary["rows"]:
        med = "-" if r["median_perturbation"] is None else f"{r['median_perturbation']:.3f}"
        lines.append(f"{r['attack']:<8}{r['threat']:<12}{r['n']:>5}{r['clean_accuracy']:>10.1%}{r['robust_accuracy']:>12.1%}{med:>14}{r['seconds']:>7.1f}s")
    return "\n".join(lines)
