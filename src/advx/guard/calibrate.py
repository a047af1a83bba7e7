"""Calibrating a guard on clean held-out data, with guarantees stated and intervals reported.

Two promises, each on its own part of the calibration data (a seeded split, so that each
promise is tested on data that did not choose it):

1. **False-positive rate of the whole policy.** The share of clean inputs that any rule flags
   (the union of the detectors — and, without a risk target, the confidence floor — not each
   alone) is at most ``fpr`` on average over calibration draws, and lies in the reported
   Clopper-Pearson interval with probability ``1 - delta``. With one rule the threshold is the
   split-conformal order statistic: the ``ceil((n+1)(1-fpr))``-th smallest clean score. With
   several, the rules share one level: each threshold is the same quantile of its own clean
   scores (fitted on one half), so that no rule spends the budget alone, and that level is set
   by the same order statistic on the other half, of each input's "first level at which no rule
   fires" (a scalar, hence exchangeable: the conformal argument holds for the union). The rate a
   threshold at the k-th of n order statistics flags is Beta(n+1-k, k) distributed (for
   continuous scores; ties only lower it), which the reported interval contains.

2. **Selective risk** (``risk=alpha``): the error rate on the inputs the guard accepts is at
   most ``alpha`` with probability at least ``1 - delta`` — the guarantee of Selection with
   Guaranteed Risk (Geifman & El-Yaniv, NeurIPS 2017), obtained by Learn-then-Test
   (Angelopoulos, Bates, Candès, Jordan & Lei, 2021) with fixed-sequence testing: candidate
   confidence floors, ordered from the strictest, each test H_j "risk(floor_j) > alpha" with
   the exact binomial p-value P(Binomial(m_j, alpha) <= errors_j) over the m_j accepted inputs
   (conditional on m_j the accepted inputs are i.i.d., so it is valid); walk the sequence while
   hypotheses are rejected at level delta and keep the loosest floor rejected. The sequence (its
   floors and where it starts) is chosen on the detector split, independent of the inputs
   tested, so the family-wise error is at most delta. Coverage is reported.

Both hold for data exchangeable with the calibration set: adversarial or drifted traffic is
exactly what breaks them, which is why the service watches the flag rate after deployment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._io import sha256_tensors
from .._validate import check_float, check_images, check_int, check_labels
from .._version import __version__
from ..errors import InputError
from ._binom import binom_cdf, clopper_pearson
from .policy import Policy
from .registry import spec_of

if TYPE_CHECKING:
    from .guard import Guard

__all__ = ["CalibrationReport", "calibrate"]

GRID = 2001  # quantile levels a shared threshold can take (0, 1/2000, ..., 1)
MAX_FLOORS = 200  # candidate confidence floors in the fixed sequence


@dataclass(frozen=True)
class CalibrationReport:
    """What calibration set and what it promises. ``fpr``: the union's false-positive rate
    (target, flagged, n, measured, interval, level). ``selective_risk``: ``None`` without a
    risk target; else target, delta, errors, accepted, n, measured, upper_bound (one-sided at
    1 - delta), coverage, floor. ``coverage``: the share of clean calibration inputs the
    policy accepts (on the part each figure was measured on)."""

    policy: Policy
    n: int
    fpr: dict[str, Any]
    selective_risk: dict[str, Any] | None
    coverage: float
    thresholds: dict[str, float] = field(default_factory=dict)
    min_confidence: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy.to_dict() | {"hash": self.policy.hash}
        return d

    def lines(self) -> list[str]:
        """The guarantees, one per line, for a person."""
        f = self.fpr
        lo, hi = f["interval"]
        out = [
            f"calibrated on {self.n} clean inputs; policy {self.policy.hash}",
            f"false-positive rate (clean inputs flagged by any rule): target "
            f"{f['target']:.4g}, measured {f['measured']:.4f} ({f['flagged']}/{f['n']}), "
            f"{f['level']:.0%} interval [{lo:.4f}, {hi:.4f}]",
        ]
        for name, t in sorted(self.thresholds.items()):
            out.append(f"  {name} > {t:.6g} -> {self.policy.on_detect}")
        r = self.selective_risk
        if r is None:
            out.append(
                f"  confidence < {self.min_confidence:.6g} -> {self.policy.on_low_confidence}"
                " (part of the false-positive budget)"
            )
        else:
            out.append(
                f"selective risk (errors among accepted inputs): <= {r['target']:.4g} with "
                f"probability >= {1 - r['delta']:.4g}; measured {r['measured']:.4f} "
                f"({r['errors']}/{r['accepted']}), one-sided upper bound {r['upper_bound']:.4f}"
            )
            out.append(
                f"  confidence < {self.min_confidence:.6g} -> {self.policy.on_low_confidence};"
                f" coverage {r['coverage']:.1%} of {r['n']} clean inputs accepted"
            )
        out.append(f"clean inputs accepted overall: {self.coverage:.1%}")
        return out


def _split(n: int, parts: list[float], seed: int) -> list[Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cuts = [0]
    for p in parts[:-1]:
        cuts.append(cuts[-1] + int(round(p * n)))
    cuts.append(n)
    return [perm[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _conformal_k(n: int, fpr: float, who: str, part: str = "") -> int:
    """The rank of the split-conformal threshold: flag what is above the k-th smallest of n."""
    k = math.ceil((n + 1) * (1 - fpr))
    if k > n:
        raise InputError(
            f"{who}: {n} clean inputs{' (' + part + ')' if part else ''} cannot pin a "
            f"false-positive rate of {fpr:g}; give at least {math.ceil((1 - fpr) / fpr)} for "
            "this part (ideally hundreds). The data is split: with a risk target half of it "
            "tests the risk, and with several rules half of the rest fits their thresholds"
        )
    return k


def _union_thresholds(
    fit: dict[str, Tensor], test: dict[str, Tensor], fpr: float
) -> tuple[dict[str, float], Tensor]:
    """One shared quantile level for several rules (see the module's docstring). ``fit`` and
    ``test``: each rule's clean scores on the two halves. Returns the thresholds and, on
    ``test``, which inputs the union flags."""
    levels = torch.linspace(0, 1, GRID, dtype=torch.float64)
    # beyond level 1 (the largest clean score of the fitting half) the thresholds go on rising
    # linearly, up to 4 score ranges above it: any family fixed by the fitting half keeps the
    # conformal argument, and a test score above every fitted one must not end the search
    beyond = torch.linspace(0, 4, GRID, dtype=torch.float64)[1:]
    n_test = next(iter(test.values())).numel()
    first_ok = torch.zeros(n_test, dtype=torch.long)
    table: dict[str, Tensor] = {}
    for name, s in fit.items():
        t = torch.quantile(s.double(), levels)  # (G,), nondecreasing in the level
        spread = float(t[-1] - t[0]) or 1.0
        t = torch.cat([t, t[-1] + beyond * spread])  # (2G - 1,)
        t = torch.cummax(t, dim=0).values  # guard against interpolation round-off
        table[name] = t
        # the first level whose threshold is >= the score: from there on this rule is quiet
        g = torch.searchsorted(t, test[name].double().contiguous(), side="left")  # (n_test,)
        first_ok = torch.maximum(first_ok, g)
    k = _conformal_k(n_test, fpr, "calibrate", part=f"the {n_test} that set the level")
    star = int(torch.sort(first_ok).values[k - 1])
    if star >= 2 * GRID - 1:
        raise InputError(
            f"calibrate: a false-positive rate of {fpr:g} needs thresholds beyond every clean "
            "score seen; give more clean inputs or a larger fpr"
        )
    thresholds = {name: float(t[star]) for name, t in table.items()}
    return thresholds, first_ok > star


def _flags(scores: dict[str, Tensor], thresholds: dict[str, float], n: int) -> Tensor:
    flagged = torch.zeros(n, dtype=torch.bool)
    for name, t in thresholds.items():
        flagged |= scores[name] > t
    return flagged


def _fixed_sequence(
    floors: list[float], conf: Tensor, wrong: Tensor, alpha: float, delta: float
) -> tuple[float | None, list[dict[str, float]]]:
    """Learn-then-Test with fixed-sequence testing over ``floors`` (strictest first): the
    loosest floor whose hypothesis 'selective risk > alpha' is rejected, with every earlier
    one rejected too (``None`` when the first is not). Also the trail of tests."""
    chosen = None
    trail = []
    for floor in floors:
        accepted = conf >= floor
        m = int(accepted.sum())
        k = int((wrong & accepted).sum())
        p = binom_cdf(k, m, alpha) if m else 1.0
        trail.append({"floor": floor, "accepted": m, "errors": k, "p_value": p})
        if p > delta:
            break
        chosen = floor
    return chosen, trail


def calibrate(
    guard: Guard,
    x: Tensor,
    y: Tensor,
    *,
    fpr: float = 0.05,
    risk: float | None = None,
    delta: float = 0.05,
    seed: int = 0,
) -> CalibrationReport:
    """Set ``guard``'s thresholds (and confidence floor) on clean held-out ``x, y``; adopt the
    new policy; return what it promises (see the module's docstring)."""
    who = "calibrate"
    check_float(fpr, name="fpr", who=who, low_open=True, high=1, high_open=True)
    check_float(delta, name="delta", who=who, low_open=True, high=1, high_open=True)
    if risk is not None:
        check_float(risk, name="risk", who=who, low_open=True, high=1, high_open=True)
    check_int(seed, name="seed", who=who, low=0)
    x = check_images(x, guard.bounds, name="x")
    y = check_labels(y, x.shape[0], x.device, name="y")
    n = int(x.shape[0])
    if n == 0:
        raise InputError("calibrate: x holds no inputs; give clean held-out inputs and labels")

    # score everything once: probabilities and every detector's score, on the CPU in float64
    probs, det = guard.score(x.to(getattr(guard.model, "device", x.device)))
    conf = probs.max(dim=1).values.double().cpu()
    wrong = probs.argmax(dim=1).cpu() != y.cpu()
    scores = {name: s.double().cpu() for name, s in det.items()}
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise InputError(f"calibrate: detector {name!r} gave non-finite scores on clean x")

    rules = dict(scores)
    if risk is None:
        # without a risk target the confidence floor is one more rule of the union
        rules["confidence"] = 1.0 - conf
    detect_part, risk_part = (
        _split(n, [0.5, 0.5], seed) if risk is not None else (_split(n, [1.0], seed)[0], None)
    )

    # ---- 1. the union's false-positive rate ---------------------------------------------------
    thresholds: dict[str, float] = {}
    if len(rules) == 1:
        ((name, s),) = rules.items()
        d = s[detect_part]
        k = _conformal_k(d.numel(), fpr, who, part="the part that sets the threshold")
        thresholds[name] = float(torch.sort(d).values[k - 1])
        test_idx = detect_part
        flagged = d > thresholds[name]
        fit_n = 0
    elif rules:
        half = detect_part.numel() // 2
        fit_idx, test_idx = detect_part[:half], detect_part[half:]
        thresholds, flagged = _union_thresholds(
            {k: s[fit_idx] for k, s in rules.items()},
            {k: s[test_idx] for k, s in rules.items()},
            fpr,
        )
        fit_n = half
    else:  # no detector and a risk target: nothing is flagged, only abstention is calibrated
        test_idx = detect_part
        flagged = torch.zeros(detect_part.numel(), dtype=torch.bool)
        fit_n = 0
    level = 1.0 - delta
    m_flag, n_flag = int(flagged.sum()), int(flagged.numel())
    fpr_report: dict[str, Any] = {
        "target": float(fpr),
        "flagged": m_flag,
        "n": n_flag,
        "measured": m_flag / n_flag if n_flag else 0.0,
        "interval": list(clopper_pearson(m_flag, n_flag, level)),
        "level": level,
        "statement": (
            "P(a clean input is flagged by any rule) <= target on average over calibration "
            f"draws; the rate lies in the interval with probability >= {level:g}"
        ),
    }
    min_confidence = 0.0
    if "confidence" in thresholds:
        # "1 - confidence > t" is "confidence < 1 - t": the guard's own floor rule
        min_confidence = min(1.0, max(0.0, 1.0 - thresholds.pop("confidence")))

    # ---- 2. the selective risk ----------------------------------------------------------------
    risk_report = None
    accepted_share = 1.0 - fpr_report["measured"]
    if risk is not None:
        assert risk_part is not None
        d_pass = ~_flags(
            {k: s[detect_part] for k, s in scores.items()}, thresholds, detect_part.numel()
        )
        floors = _floors(
            conf[detect_part][d_pass],
            wrong[detect_part][d_pass],
            n_scale=risk_part.numel() / max(1, detect_part.numel()),
            alpha=float(risk),
            delta=float(delta),
        )
        r_scores = {k: s[risk_part] for k, s in scores.items()}
        r_pass = ~_flags(r_scores, thresholds, risk_part.numel())
        r_conf, r_wrong = conf[risk_part][r_pass], wrong[risk_part][r_pass]
        chosen, trail = _fixed_sequence(floors, r_conf, r_wrong, float(risk), float(delta))
        if chosen is None:
            first = trail[0] if trail else {"accepted": 0, "errors": 0}
            raise InputError(
                f"calibrate: cannot certify a selective risk of {risk:g} with probability "
                f"{1 - delta:g} on {risk_part.numel()} clean inputs (the strictest floor tried "
                f"accepted {first['accepted']} with {first['errors']} errors); give more "
                "calibration data, a larger --risk or a larger --delta"
            )
        min_confidence = chosen
        acc = r_conf >= chosen
        m, k = int(acc.sum()), int((r_wrong & acc).sum())
        n_r = risk_part.numel()
        # one-sided (1 - delta) upper bound on the risk: the p with P(Bin(m, p) <= k) = delta
        upper = 1.0 if m == 0 else clopper_pearson(k, m, 1 - 2 * delta)[1]
        risk_report = {
            "target": float(risk),
            "delta": float(delta),
            "errors": k,
            "accepted": m,
            "n": n_r,
            "measured": k / m if m else 0.0,
            "upper_bound": upper,
            "coverage": m / n_r,
            "floor": chosen,
            "tests": len(trail),
            "statement": (
                f"P(selective risk <= {risk:g}) >= {1 - delta:g}: Learn-then-Test, "
                "fixed-sequence binomial tests over confidence floors"
            ),
        }
        accepted_share = m / n_r

    scales = {
        name: float(s[detect_part].std()) if detect_part.numel() > 1 else 1.0
        for name, s in rules.items()
    }
    specs = {}
    for name, detector in guard.detectors.items():
        cls = type(detector)
        spec = spec_of(detector, guard.model)
        specs[name] = spec or {"kind": "custom", "class": f"{cls.__module__}.{cls.__name__}"}
    guarantees: dict[str, Any] = {"fpr": fpr_report}
    if risk_report is not None:
        guarantees["selective_risk"] = risk_report
    old = guard.policy
    policy = Policy(
        thresholds=thresholds,
        min_confidence=float(min_confidence),
        on_detect=old.on_detect,
        on_low_confidence=old.on_low_confidence,
        model_fingerprint=guard.model.fingerprint(),
        guarantees=guarantees,
        calibration={
            "data_sha256": sha256_tensors(x.cpu(), y.cpu()),
            "n": n,
            "input_shape": list(x.shape[1:]),
            "n_fpr": n_flag,
            "n_fpr_fit": fit_n,
            "n_risk": 0 if risk_part is None else int(risk_part.numel()),
            "seed": seed,
            "scales": {k: (v if v > 0 else 1.0) for k, v in scales.items()},
            "advx_version": __version__,
        },
        detectors=specs,
    )
    guard.use(policy)
    for name, t in thresholds.items():
        guard.detectors[name].threshold = t
    return CalibrationReport(
        policy=policy,
        n=n,
        fpr=fpr_report,
        selective_risk=risk_report,
        coverage=accepted_share,
        thresholds=dict(thresholds),
        min_confidence=float(min_confidence),
    )


def _critical(m: int, alpha: float, delta: float) -> int:
    """The most errors among m accepted inputs with which "risk > alpha" is still rejected at
    level delta (-1: none, m is too small)."""
    lo, hi = -1, m  # binom_cdf(k, m, alpha) increases with k: find the last k with it <= delta
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if binom_cdf(mid, m, alpha) <= delta:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _floors(
    conf_d: Tensor, wrong_d: Tensor, *, n_scale: float, alpha: float, delta: float
) -> list[float]:
    """The fixed sequence of confidence floors, strictest first, chosen on the detector split
    only (so it is fixed before the risk split is looked at, as fixed-sequence testing needs):
    up to MAX_FLOORS of its accepted inputs' confidences, ending at 0 (accept everything).

    Where it starts matters: a floor so strict that it accepts a handful of inputs cannot be
    certified and would end the sequence at once. So it starts at the strictest floor whose test
    the detector split predicts to pass with probability >= 0.9 (from its own error rate, with
    one error added for caution, and its count scaled to the risk split), else at the floor
    with the best predicted power."""
    order = torch.argsort(conf_d, descending=True)
    c, w = conf_d[order], wrong_d[order]
    if c.numel() == 0:
        return [0.0]
    errs = torch.cumsum(w.long(), dim=0)
    ranks = torch.linspace(1, c.numel(), min(MAX_FLOORS, c.numel())).round().long().unique()
    start, best = int(ranks[-1]), -1.0
    for j in ranks.tolist():
        m = max(1, round(j * n_scale))
        r = (int(errs[j - 1]) + 1) / (j + 1)
        crit = _critical(m, alpha, delta)
        power = binom_cdf(crit, m, r) if crit >= 0 else 0.0
        if power >= 0.9:
            start = j
            break
        if power > best:
            start, best = j, power
    out: list[float] = []
    for j in ranks.tolist():
        f = float(c[j - 1])
        if j >= start and (not out or f < out[-1]):
            out.append(f)
    if not out or out[-1] > 0.0:
        out.append(0.0)
    return out
