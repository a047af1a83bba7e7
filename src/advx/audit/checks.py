"""Sanity checks: signs that an evaluation overestimates robustness (gradient masking, a
randomized model, an attack that has not converged). Each finding has a code, a severity, a
message that says what was seen, and a line of advice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import attacks
from .._rng import derive_seed
from ..attacks._losses import ce
from ..models._base import ACCESS_RANK, ModelView, Tracker
from ..threat import ThreatModel
from ._text import plural

__all__ = [
    "Finding",
    "check_model",
    "check_blackbox_gain",
    "check_curve",
    "check_convergence",
    "large_eps",
]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error": the robust accuracy cannot be trusted; "warning": look closer; "info"
    message: str
    advice: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model(model, x: Tensor, y: Tensor) -> list[Finding]:
    """Before the attacks: is the model deterministic, does it return logits, are its input
    gradients alive?"""
    out: list[Finding] = []
    if ACCESS_RANK[model.access] < ACCESS_RANK["scores"] or x.shape[0] == 0:
        return out
    view = ModelView(model, Tracker(x.shape[0], x.device))
    with model.prepared():
        a = view.logits(x)
        b = view.logits(x)
    scale = float(a.abs().max()) or 1.0
    gap = float((a - b).abs().max())
    if gap > 1e-4 * scale:
        flips = int((a.argmax(1) != b.argmax(1)).sum())
        out.append(
            Finding(
                "randomized-model",
                "error",
                f"two passes over the same {x.shape[0]} inputs disagree (largest logit gap "
                f"{gap:.3g}, {flips} predictions changed): the model is randomized",
                "attack the expected output instead (EOT: average gradients over many passes) "
                "and report accuracy over repeated passes; a randomized model defeats one-pass "
                "attacks by chance",
                {"max_logit_gap": gap, "prediction_flips": flips},
            )
        )
    sums = a.sum(dim=1)
    if bool((a >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        out.append(
            Finding(
                "probability-outputs",
                "warning",
                "the model returns probabilities (rows are >= 0 and sum to 1), not logits",
                "return logits (or pass output= to the Classifier): softmax saturates and hides "
                "the gradients that attacks follow, which overstates robustness",
            )
        )
    if model.access == "gradients":
        with model.prepared():
            _, grad, _ = view.value_and_grad(x, ce, y)
        flat = grad.flatten(1)
        dead = ~torch.isfinite(flat).all(dim=1) | (flat.abs().amax(dim=1) == 0)
        share = float(dead.float().mean())
        if share > 0.01:
            out.append(
                Finding(
                    "masked-gradients",
                    "error" if share > 0.1 else "warning",
                    f"{share:.0%} of the inputs have an all-zero or non-finite loss gradient",
                    "gradient-based attacks cannot move these points: suspect gradient masking "
                    "(non-differentiable preprocessing, saturated softmax, quantization); attack "
                    "through such parts with BPDA and check the black-box stages",
                    {"share": share},
                )
            )
    return out


# A black-box stage may break a few points the white-box ones missed on a sound model (Square
# breaks about 0.7% of the points APGD leaves on the TRADES SmallCNN, benchmarks/RESULTS.md); on
# a masked one it breaks many more (6% after FGSM-RS training gone wrong). More than this share
# of the points that reached the stage (and more than 2 points) fails the audit.
_BLACKBOX_GAIN_ERROR = 0.02


def check_blackbox_gain(
    broken_by: Tensor,
    stages: list[attacks.Attack],
    clean_correct: Tensor,
    ran_on: list[int] | None = None,
) -> list[Finding]:
    """A score- or label-based stage that breaks points every white-box stage missed.

    ``ran_on[k]``: how many points stage k actually ran on (a gated stage runs on only the
    closest few); without it, every point still robust when the stage began."""
    out: list[Finding] = []
    white = [k for k, a in enumerate(stages) if a.access == "gradients"]
    if not white:
        return out
    for k, a in enumerate(stages):
        if a.access == "gradients" or k < max(white):
            continue
        gained = int((broken_by == k).sum())
        reached = int((clean_correct & ((broken_by < 0) | (broken_by >= k))).sum())
        if ran_on is not None:
            reached = ran_on[k]
        if gained:
            share = gained / max(1, reached)
            out.append(
                Finding(
                    "blackbox-beats-whitebox",
                    "error" if gained > 2 and share > _BLACKBOX_GAIN_ERROR else "warning",
                    f"{a.name} (no gradients) broke {plural(gained, 'point')} that the white-box "
                    f"attacks could not ({share:.1%} of the {plural(reached, 'point')} it ran on)",
                    "a gradient-free attack should not beat gradient-based ones: suspect "
                    "gradient masking; treat the white-box numbers with suspicion and check the "
                    "gradients (BPDA, EOT)",
                    {"attack": a.name, "points": gained, "share": round(share, 4)},
                )
            )
    return out


def large_eps(threat: ThreatModel, x: Tensor) -> float:
    """A budget that allows any image in the box: every classifier must fail at it."""
    lo, hi = threat.bounds
    d = x[0].numel()
    return {"linf": hi - lo, "l2": (hi - lo) * math.sqrt(d), "l1": (hi - lo) * d}[threat.norm]


def check_curve(
    eps: list[float],
    acc: list[float],
    *,
    n: int,
    large: float | None = None,
    acc_large: float | None = None,
    eps0: float | None = None,
    beyond: int | None = None,
) -> list[Finding]:
    """Robust accuracy must not rise with eps, and must fall towards 0 when eps allows anything;
    the curve's own attacks must not break, within the audited eps, samples the cascade left
    robust (``beyond`` of the curve's ``n``)."""
    out = []
    if beyond:
        out.append(
            Finding(
                "cascade-missed-points",
                "warning",
                f"the eps curve's attacks broke {beyond} of its {n} samples within the audited "
                f"eps{'' if eps0 is None else f' {eps0:g}'} that the cascade called robust: the "
                f"headline robust accuracy overstates, by at least {beyond / max(n, 1):.1%} on "
                "those samples",
                "strengthen the suite (more restarts or steps, or suite='standard'), or add the "
                "curve's minimum-norm attack (fmn) as a stage",
                {"broken_beyond_cascade": beyond, "n": n},
            )
        )
    slack = 1.5 / max(n, 1)  # one sample's worth, and a half
    rises = [(eps[i], eps[i + 1]) for i in range(len(eps) - 1) if acc[i + 1] > acc[i] + slack]
    if rises:
        a, b = rises[0]
        out.append(
            Finding(
                "accuracy-rises-with-eps",
                "error",
                f"robust accuracy rises from eps {a:g} to {b:g}: a larger budget contains the "
                "smaller one",
                "the attack is not finding what it should (too few steps, a bad step size, "
                "randomness, or masked gradients); add restarts and steps until the curve falls",
                {"pairs": rises},
            )
        )
    if acc_large is not None and acc_large > 0.05:
        out.append(
            Finding(
                "large-eps-not-zero",
                "error",
                f"at eps {large:g}, where any input can be turned into any other, {acc_large:.0%} "
                "of the points still resist the attack",
                "no classifier can resist an unlimited perturbation: the gradients are masked or "
                "the model is broken; do not trust the robust accuracy",
                {"eps": large, "robust_accuracy": acc_large},
            )
        )
    return out


def check_convergence(
    model, x: Tensor, y: Tensor, threat: ThreatModel, index: Tensor, *, steps: int, seed: int
) -> list[Finding]:
    """On points the cascade left robust: does an attack with many more steps still break some?"""
    if x.shape[0] == 0 or model.access != "gradients":
        return []
    name = "apgd" if "apgd" in attacks.list_attacks() else "pgd"
    attack = attacks.create(name, threat, steps=steps, seed=derive_seed(seed, 9001))
    r = attack(model, x, y, index=index)
    share = r.success_rate
    if share > 0.02:
        return [
            Finding(
                "not-converged",
                "warning",
                f"{name} with {steps} steps broke {share:.1%} of the "
                f"{plural(x.shape[0], 'point')} the cascade left robust",
                "more steps still help a lot: raise steps and restarts (or use the standard "
                "suite) before trusting the number",
                {
                    "attack": name,
                    "steps": steps,
                    "checked": x.shape[0],
                    "broken": int(r.success.sum()),
                },
            )
        ]
    return []
