"""A guarded model's decisions on clean and adversarial inputs, as a plain-text table (the end
of ``advx demo``)."""

from __future__ import annotations

from torch import Tensor

from .decision import ACTIONS, Decisions
from .guard import Guard

__all__ = ["show_decisions"]


def show_decisions(guard: Guard, x_clean: Tensor, x_adv: Tensor, *, y: Tensor | None = None) -> str:
    """What ``guard`` does with clean inputs and with adversarial ones: one row each, the share
    of every action (accept, fallback, abstain, review, reject). With the true labels ``y``
    (of the clean inputs, which the adversarial ones were made from), also how many of the
    accepted answers are wrong — the number the guard exists to keep low.
    """
    rows: list[tuple[str, Decisions]] = [("clean", guard(x_clean)), ("adversarial", guard(x_adv))]
    head = ["inputs", "n", *ACTIONS] + (["wrong & accepted"] if y is not None else [])
    table = [head]
    for name, d in rows:
        n = len(d)
        cells = [name, str(n)]
        cells += [f"{d.count(a) / n:.0%}" if n else "-" for a in ACTIONS]
        if y is not None:
            wrong = sum(
                1 for dec, t in zip(d, y.tolist(), strict=False) if dec.accepted and dec.label != t
            )
            cells.append(f"{wrong}/{n}")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pol = guard.policy
    rules = [f"{k} > {v:.4g}" for k, v in sorted(pol.thresholds.items())]
    rules.append(f"confidence < {pol.min_confidence:.3g}")
    fpr = pol.guarantees.get("fpr")
    note = f"policy {pol.hash}: " + ", ".join(rules)
    if fpr:
        lo, hi = fpr["interval"]
        note += f"; calibrated clean flag rate {fpr['measured']:.1%} (interval {lo:.1%}-{hi:.1%})"
    return "\n".join([*lines, note])
