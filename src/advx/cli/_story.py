"""The demo: the whole story on the embedded MNIST slice, offline, in a few minutes on 2 cores.

1. Train a small CNN, break it with FGSM, PGD and CW (a table and ``examples.png``).
2. Audit it: broken.
3. Train the same network with FGSM-RS (Wong et al. 2020) and audit it again: robust.
4. Distill one at T=100 (Papernot et al. 2016): PGD on the cross-entropy barely moves it, the
   audit's sanity checks flag its gradients, and CW breaks it (Carlini & Wagner 2017).
5. One HTML page comparing the three audits (``report.html``) beside their JSON reports.

Each step is a function of the :class:`Demo` (the trained models, the held-out digits, the
summary so far) in :data:`STEPS`; a later step appends itself there and reads ``demo.models``
and ``demo.x`` / ``demo.y``. ``QUICK`` tells the same story on less data in about a quarter of
the time (the tests run it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import attacks
from .._io import atomic_open, write_json
from .._provenance import provenance
from ..data import data_sha256, load
from ..models import Classifier
from ..threat import L2, Linf
from ..training import History, Schedule, distillation, fgsm_rs, fit, standard
from ..zoo import nets

__all__ = ["Demo", "Size", "FULL", "QUICK", "STEPS", "run_demo", "format_table"]

LINF_EPS = (0.05, 0.1, 0.2, 0.3)
L2_EPS = (0.5, 1.0, 1.5, 2.0)
# The story's threat: at 0.3 a LeNet trained with FGSM-RS on 4,000 digits for a minute is only
# partly robust (about a third of the points); at 0.2 it holds three quarters of them.
STORY_EPS = 0.2
TEMPERATURE = 100.0


@dataclass(frozen=True)
class Size:
    """How much the demo does. ``n`` held-out digits are attacked, the first ``audit_n`` of them
    audited and the first ``cw_n`` attacked with CW (it runs many more passes per sample than
    PGD); ``train_n`` training digits (None: all 4,000); ``epochs`` train the standard model,
    the teacher and the student, ``harden_epochs`` the FGSM-RS model."""

    n: int = 500
    audit_n: int = 200
    cw_n: int = 200
    train_n: int | None = None
    epochs: int = 4
    harden_epochs: int = 10


FULL = Size()
# The same claims (standard broken, FGSM-RS robust and reliable, distillation flagged) on 2,000
# training digits and 50 audited ones: about 80 s of one CPU core, against about 140 s with 100
# audited (the audit of the robust model costs the most: Square's 5,000 queries).
QUICK = Size(n=100, audit_n=50, cw_n=25, train_n=2000, epochs=3, harden_epochs=8)


@dataclass
class Demo:
    """What the steps share: the data, the trained models (``"standard"``, ``"fgsm-rs"``,
    ``"distilled"``, each an eval-mode Classifier), the audits and the summary being built."""

    out: Path
    size: Size
    seed: int
    echo: Callable[[str], None]
    x_train: Tensor
    y_train: Tensor
    x: Tensor  # (n, 1, 28, 28) held-out digits, never trained on
    y: Tensor
    models: dict[str, Classifier] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    reports: list[tuple[str, Any]] = field(default_factory=list)  # (title, audit Report)

    @property
    def x_audit(self) -> Tensor:
        return self.x[: self.size.audit_n]

    @property
    def y_audit(self) -> Tensor:
        return self.y[: self.size.audit_n]

    def train(self, net: nn.Module, desc: str, **kw: Any) -> History:
        """Train ``net`` on the demo's training digits (batch 64, the demo's seed)."""
        return fit(net, self.x_train, self.y_train, batch_size=64, seed=self.seed, desc=desc, **kw)


def run_demo(
    out: str | Path = "advx-demo",
    *,
    size: Size = FULL,
    seed: int = 0,
    echo: Callable[[str], None] = lambda s: None,
    **overrides: int,
) -> Demo:
    """The demo (see the module's docstring); writes ``summary.json``, ``examples.png``,
    ``audit-*.json`` and ``report.html`` into ``out``. Returns the :class:`Demo`: its
    ``summary`` (what ``summary.json`` holds), ``models`` and held-out digits.

    ``size`` is :data:`FULL` or :data:`QUICK`; ``overrides`` change its fields (``n=40``).
    """
    size = replace(size, **overrides)
    size = replace(size, audit_n=min(size.audit_n, size.n), cw_n=min(size.cw_n, size.n))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x_train, y_train = load("mnist-demo", split="train", n=size.train_n)
    x, y = load("mnist-demo", split="test", n=size.n)
    demo = Demo(out, size, seed, echo, x_train, y_train, x, y)
    demo.files["summary"] = str(out / "summary.json")
    for step in STEPS:
        step(demo)
    demo.summary["files"] = demo.files
    demo.summary["seconds"] = round(time.perf_counter() - start, 2)
    demo.summary["provenance"] = provenance(
        device="cpu", seed=seed, data="mnist-demo:test", data_sha256=data_sha256(x, y)
    )
    write_json(out / "summary.json", demo.summary)
    return demo


# ---- the steps ---------------------------------------------------------------------------------
def break_standard(demo: Demo) -> None:
    """1. Train a LeNet, break it with FGSM, PGD (Linf) and CW (L2); ``examples.png``."""
    size, seed, echo, x, y = demo.size, demo.seed, demo.echo, demo.x, demo.y
    echo(f"training a LeNet on {len(demo.x_train):,} embedded MNIST digits ({size.epochs} epochs)")
    net = _lenet(seed)
    history = demo.train(net, "train", schedule=Schedule(epochs=size.epochs, lr=2e-3))
    seconds = history.seconds
    model = demo.models["standard"] = Classifier(net.eval())
    clean = model.predict(x) == y
    clean_acc = float(clean.float().mean())
    echo(
        f"clean accuracy on {len(x)} held-out digits: {clean_acc:.1%}  (trained in {seconds:.1f}s)"
    )

    rows: list[dict[str, Any]] = []
    keep: dict[str, Any] = {}
    for name, make in (
        ("fgsm", lambda e: attacks.FGSM(Linf(e), seed=seed)),
        ("pgd", lambda e: attacks.PGD(Linf(e), steps=40, seed=seed)),
    ):
        for eps in LINF_EPS:
            echo(f"{name} at Linf eps {eps}")
            r = make(eps)(model, x, y)
            rows.append(_row(name, f"linf:{eps:g}", r.success, r.distance, r, clean_acc))
            if name == "pgd" and eps == 0.2:
                keep["pgd"] = r
    m = size.cw_n
    echo(f"cw (minimum-norm L2) on the first {m} digits")
    cw = _cw(seed)(model, x[:m], y[:m])
    keep["cw"] = cw
    for eps in L2_EPS:
        ok = cw.success & (cw.distance <= eps + 1e-6)
        rows.append(_row("cw", f"l2:{eps:g}", ok, cw.distance, cw, float(clean[:m].float().mean())))

    picture = _grid(x, y, model, keep)
    if picture is not None:
        with atomic_open(demo.out / "examples.png", "wb") as f:
            f.write(picture)
        demo.files["examples"] = str(demo.out / "examples.png")
    else:
        echo("matplotlib is not installed: no examples.png (pip install 'advx[report]')")
    cw_keys = ("median_distance", "mean_distance", "success_rate", "queries", "grads", "seconds")
    demo.summary.update(
        {
            "advx_demo": 2,
            "clean_accuracy": clean_acc,
            "n": len(x),
            "rows": rows,
            "cw": {k: v for k, v in cw.summary().items() if k in cw_keys},
            "training": {
                "model": "lenet",
                "data": "mnist-demo:train",
                "samples": len(demo.x_train),
                "epochs": history.epochs,
                "seconds": round(seconds, 2),
            },
            "story": {
                "threat": Linf(STORY_EPS).to_dict(),
                "suite": "fast",
                "n": len(demo.x_audit),
                "models": [],
            },
        }
    )
    _audit(demo, "standard", "standard", seconds)


def harden(demo: Demo) -> None:
    """2-3. Train the same LeNet with FGSM-RS (cyclic lr) and audit it."""
    epochs = demo.size.harden_epochs
    demo.echo(
        f"training the same LeNet with FGSM-RS at Linf {STORY_EPS:g} ({epochs} epochs, cyclic lr)"
    )
    net = _lenet(demo.seed)
    history = demo.train(
        net,
        "fgsm-rs",
        loss=fgsm_rs(STORY_EPS),
        schedule=Schedule(epochs=epochs, lr=5e-3, lr_schedule="cyclic"),
    )
    demo.models["fgsm-rs"] = Classifier(net.eval())
    _audit(demo, "fgsm-rs", "FGSM-RS", history.seconds)


def distill(demo: Demo) -> None:
    """4. Defensive distillation: PGD on the cross-entropy fails, CW and the audit do not."""
    seed, echo = demo.seed, demo.echo
    echo(
        f"defensive distillation at T={TEMPERATURE:g}: a teacher, then a student on its soft labels"
    )
    schedule = Schedule(epochs=demo.size.epochs, lr=5e-3)
    teacher = _lenet(seed + 1)
    h1 = demo.train(teacher, "teacher", loss=standard(TEMPERATURE), schedule=schedule)
    student = _lenet(seed + 2)
    h2 = demo.train(
        student, "student", loss=distillation(teacher.eval(), TEMPERATURE), schedule=schedule
    )
    seconds = h1.seconds + h2.seconds
    distilled = demo.models["distilled"] = Classifier(student.eval())
    x, y = demo.x_audit, demo.y_audit
    ok = distilled.predict(x) == y
    xs, ys = x[ok], y[ok]
    pgd = attacks.PGD(Linf(STORY_EPS), steps=40, seed=seed)(distilled, xs, ys)
    cw = _cw(seed)(distilled, xs, ys)
    broken = cw.distance[cw.success]
    median = float(broken.median()) if broken.numel() else None
    echo(
        f"  PGD-40 on the cross-entropy at Linf {STORY_EPS:g}: {pgd.success_rate:.1%} success;  "
        f"CW-L2: {cw.success_rate:.1%} success, median L2 "
        + ("-" if median is None else f"{median:.2f}")
    )
    demo.summary["story"]["distilled_attacks"] = {
        "pgd_ce_success_rate": pgd.success_rate,
        "cw_success_rate": cw.success_rate,
        "cw_median_l2": median,
        "n": len(xs),
    }
    _audit(demo, "distilled", f"distilled (T={TEMPERATURE:g})", seconds)


def compare(demo: Demo) -> None:
    """5. One HTML page comparing the audits."""
    from ..audit.html import render_comparison

    page = render_comparison(
        demo.reports, title="advx demo: a standard, an FGSM-RS and a distilled LeNet"
    )
    with atomic_open(demo.out / "report.html", "w") as f:
        f.write(page)
    demo.files["report"] = str(demo.out / "report.html")


def guard(demo: Demo) -> None:
    """6. The standard model deployed behind a guard: calibrated on held-out clean digits (5%
    of clean inputs flagged, the error on accepted ones at most 2% with probability 95%), then
    shown clean digits and PGD's adversarial versions of them. Nothing is served: the decisions
    are those ``advx serve`` would answer with."""
    from ..guard import Guard
    from ..guard.registry import build_detectors
    from ..guard.story import show_decisions

    model, seed, echo = demo.models["standard"], demo.seed, demo.echo
    # calibration digits the shown ones never overlap: the end of the embedded test split
    x_all, y_all = load("mnist-demo", split="test")
    k = min(len(demo.x), 100)
    x_cal, y_cal = x_all[-400:], y_all[-400:]
    x_show, y_show = demo.x[:k], demo.y[:k]
    echo(
        f"guarding the standard model: feature squeezing + energy OOD score, calibrated on "
        f"{len(x_cal)} other held-out digits"
    )
    g = Guard(model, detectors=build_detectors("feature_squeezing,energy", model))
    report = g.calibrate(x_cal, y_cal, fpr=0.05, risk=0.02, delta=0.05, seed=seed)
    x_adv = attacks.PGD(Linf(STORY_EPS), steps=40, seed=seed)(model, x_show, y_show).x_adv
    table = show_decisions(g, x_show, x_adv, y=y_show)
    clean, adv = g(x_show), g(x_adv)
    demo.summary["guard"] = {
        "table": table.splitlines(),
        "policy": report.to_dict(),
        "threat": Linf(STORY_EPS).to_dict(),
        "n": k,
        "clean": {a: clean.count(a) for a in ("accept", "abstain", "review", "reject")},
        "adversarial": {a: adv.count(a) for a in ("accept", "abstain", "review", "reject")},
        "adversarial_accepted_wrong": sum(
            1 for d, t in zip(adv, y_show.tolist(), strict=True) if d.accepted and d.label != t
        ),
    }


# The demo's steps, in order. A new step goes last.
STEPS: list[Callable[[Demo], None]] = [break_standard, harden, distill, compare, guard]


# ---- pieces ------------------------------------------------------------------------------------
def _audit(demo: Demo, key: str, title: str, seconds: float) -> None:
    """Audit ``demo.models[key]`` on the audited digits; a row of the story's table."""
    from ..audit import audit

    x, y = demo.x_audit, demo.y_audit
    demo.echo(f"auditing the {title} model (suite fast, Linf {STORY_EPS:g}, {len(x)} digits)")
    report = audit(demo.models[key], x, y, Linf(STORY_EPS), suite="fast", seed=demo.seed)
    assert report is not None  # None only on the other ranks under torchrun
    path = demo.out / f"audit-{key}.json"
    report.save(path)
    demo.files[f"audit-{key}"] = str(path)
    demo.reports.append((title, report))
    demo.summary["story"]["models"].append(
        {
            "model": title,
            "clean_accuracy": report.clean_accuracy,
            "robust_accuracy": report.robust_accuracy,
            "reliable": report.reliable,
            "findings": [f.code for f in report.findings],
            "training_seconds": round(seconds, 2),
        }
    )
    flags = ", ".join(f.code for f in report.findings) or "none"
    demo.echo(
        f"  clean {report.clean_accuracy:.1%}, robust {report.robust_accuracy:.1%}, "
        f"sanity-check findings: {flags}"
    )


def _cw(seed: int) -> attacks.CW:
    return attacks.CW(
        L2(float("inf")), steps=100, search_steps=4, initial_c=1.0, lr=0.05, seed=seed
    )


def _lenet(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nets.lenet()


def _row(
    attack: str, threat: str, success: Tensor, distance: Tensor, result: Any, clean_acc: float
) -> dict[str, Any]:
    d = distance[success]
    return {
        "attack": attack,
        "threat": threat,
        "n": len(success),
        "clean_accuracy": clean_acc,
        "robust_accuracy": float((~success).float().mean()),
        "median_perturbation": float(d.median()) if d.numel() else None,
        "queries": int(result.queries.sum()),
        "grads": int(result.grads.sum()),
        "seconds": round(result.seconds, 3),
    }


def _grid(x: Tensor, y: Tensor, model: Classifier, keep: dict[str, Any]) -> bytes | None:
    from ..viz import example_grid, have_matplotlib

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
        captions = [
            f"-> {int(p)}  ({r.threat.norm} {float(d):.2f})" for p, d in zip(pred, r.distance[pick])
        ]
        columns.append((title, r.x_adv[pick], captions))
    return example_grid(x[pick], columns, row_labels=[f"label {int(v)}" for v in y[pick]])


def format_table(summary: dict[str, Any]) -> str:
    """The demo's results as plain-text tables."""
    head = ("attack", "threat", "n", "clean acc", "robust acc", "median pert.", "time")
    lines = [
        f"{head[0]:<8}{head[1]:<12}{head[2]:>5}{head[3]:>10}{head[4]:>12}{head[5]:>14}{head[6]:>8}"
    ]
    for r in summary["rows"]:
        med = "-" if r["median_perturbation"] is None else f"{r['median_perturbation']:.3f}"
        lines.append(
            f"{r['attack']:<8}{r['threat']:<12}{r['n']:>5}{r['clean_accuracy']:>10.1%}"
            f"{r['robust_accuracy']:>12.1%}{med:>14}{r['seconds']:>7.1f}s"
        )
    story = summary.get("story")
    if story:
        t = story["threat"]
        lines += [
            "",
            f"audit (suite {story['suite']}, {t['norm']} eps {t['eps']:g}, {story['n']} digits)",
            f"{'model':<20}{'clean acc':>10}{'robust acc':>12}  sanity checks",
        ]
        for m in story["models"]:
            flags = ", ".join(m["findings"]) or "ok"
            lines.append(
                f"{m['model']:<20}{m['clean_accuracy']:>10.1%}"
                f"{m['robust_accuracy']:>12.1%}  {flags}"
            )
    guarded = summary.get("guard")
    if guarded:
        t = guarded["threat"]
        lines += [
            "",
            f"the standard model behind a calibrated guard: {guarded['n']} clean digits and "
            f"their PGD versions ({t['norm']} eps {t['eps']:g})",
            *guarded["table"],
        ]
    return "\n".join(lines)
