"""Two audits of the same data, threat and suite, compared: the gate against a regression.

comparison = advx.compare("base.json", report, max_drop=0.01)   # or advx.audit.comparison.compare
comparison.passed, comparison.robust_accuracy.delta, comparison.newly_broken

A different model is the normal case (that is what a gate compares); different data, a
different threat model or a different suite make the numbers incomparable and are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_open, read_json
from .._provenance import now
from ..errors import InputError
from ._codec import decode, encode
from ._text import fmt_ci, plural
from .gate import Check, reliable_check
from .report import DataInfo, Page, Report, SuiteInfo, ThreatInfo, stage_labels
from .stats import LEVEL, count_of, newcombe, wilson

__all__ = [
    "SCHEMA",
    "Comparison",
    "Side",
    "Delta",
    "StageDelta",
    "ClassDelta",
    "compare",
    "check_comparable",
]

SCHEMA = "advx-comparison/1"
_TOLERANCE = 1e-9  # a drop of exactly max_drop passes, whatever the float rounding


@dataclass(frozen=True, kw_only=True)
class Side:
    """One of the two audits: where it came from and which model it measured."""

    label: str  # the file, or "base" / "new"
    model: str  # how the model was named (--model), else its repr
    sha256: str  # the model's fingerprint: weights and input space
    weights_sha256: str | None
    created: str
    reliable: bool


@dataclass(frozen=True, kw_only=True)
class Delta:
    """An accuracy in both audits, the change (new - base), and their intervals."""

    base: float
    new: float
    delta: float
    base_ci: list[float]  # Wilson
    new_ci: list[float]
    delta_ci: list[float]  # Newcombe's hybrid score interval of new - base


@dataclass(frozen=True, kw_only=True)
class StageDelta:
    stage: int
    attack: str  # the stage's label (``apgd (loss=ce)``)
    robust_accuracy_after: Delta


@dataclass(frozen=True, kw_only=True)
class ClassDelta:
    label: int = field(metadata={"json": "class"})
    n: int
    clean_accuracy: Delta
    robust_accuracy: Delta


@dataclass(frozen=True, kw_only=True)
class Comparison(Page):
    """What changed from the base audit to the new one. ``passed``: every check held."""

    schema: str = SCHEMA
    created: str
    base: Side
    new: Side
    data: DataInfo
    threat: ThreatInfo
    suite: SuiteInfo
    ci_level: float
    max_drop: float | None
    clean_accuracy: Delta
    robust_accuracy: Delta
    cascade: list[StageDelta]
    per_class: list[ClassDelta]
    newly_broken: list[int]  # robust in the base audit, not in the new one (sample indices)
    newly_robust: list[int]  # the other way round
    checks: list[Check]
    passed: bool

    def __repr__(self) -> str:
        r = self.robust_accuracy
        return (
            f"Comparison(robust {r.base:.2%} -> {r.new:.2%} ({r.delta:+.2%}), "
            f"{len(self.newly_broken)} newly broken, {'PASS' if self.passed else 'FAIL'})"
        )

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "comparison") -> Comparison:
        """The comparison a JSON document (``to_dict``, ``advx compare --json``) describes."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{where}: not an {SCHEMA} document (schema: {found!r})")
        return decode(cls, data, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Comparison:
        return cls.from_dict(read_json(path, name="comparison"), where=str(path))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_open(path, "w") as f:
            f.write(self.to_json() + "\n")
        return path

    def to_html(self) -> str:
        from .html import render_diff

        return render_diff(self)

    def summary_lines(self) -> list[str]:
        """A few lines for a terminal."""
        lv = f"{self.ci_level:.0%}"
        lines = [
            f"base {self.base.label}: {self.base.model} ({self.base.sha256[:12]})",
            f"new  {self.new.label}: {self.new.model} ({self.new.sha256[:12]})",
            f"robust accuracy  {_delta(self.robust_accuracy)}   "
            f"({plural(self.data.n, 'sample')}; {lv} intervals)",
            f"clean accuracy   {_delta(self.clean_accuracy)}",
        ]
        for s in self.cascade:
            lines.append(f"  after {s.attack:<28} {_delta(s.robust_accuracy_after)}")
        moved = [r for r in self.per_class if r.robust_accuracy.delta != 0]
        for row in sorted(moved, key=lambda r: r.robust_accuracy.delta)[:5]:
            lines.append(f"  class {row.label:<4} robust {_delta(row.robust_accuracy)}")
        lines.append(
            f"{plural(len(self.newly_broken), 'sample')} newly broken"
            + (f" ({_indices(self.newly_broken)})" if self.newly_broken else "")
            + f", {len(self.newly_robust)} newly robust"
        )
        for c in self.checks:
            lines.append(f"{'PASS' if c.passed else 'FAIL'}: {c.name}: {c.message}")
        return lines

    def markdown_lines(self) -> list[str]:
        """The comparison as Markdown (a section of a CI job summary)."""
        lv = f"{self.ci_level:.0%}"
        out = [
            "### Against the baseline",
            "",
            f"- base `{self.base.label}`: `{self.base.model}` `{self.base.sha256[:12]}`",
            f"- new `{self.new.label}`: `{self.new.model}` `{self.new.sha256[:12]}`",
            "",
            f"| | base | new | change | {lv} interval of the change |",
            "|---|---|---|---|---|",
        ]
        rows = [("clean", self.clean_accuracy)]
        rows += [(f"after {s.attack}", s.robust_accuracy_after) for s in self.cascade]
        rows.append(("**robust**", self.robust_accuracy))
        rows += [(f"class {c.label} robust", c.robust_accuracy) for c in self.per_class]
        for name, d in rows:
            out.append(
                f"| {name} | {d.base:.2%} | {d.new:.2%} | {d.delta:+.2%} | "
                f"[{d.delta_ci[0]:+.1%}, {d.delta_ci[1]:+.1%}] |"
            )
        out += [
            "",
            f"{plural(len(self.newly_broken), 'sample')} newly broken"
            + (f": {_indices(self.newly_broken, 40)}" if self.newly_broken else "")
            + f"; {len(self.newly_robust)} newly robust.",
            "",
        ]
        return out


def _delta(d: Delta) -> str:
    return (
        f"{d.base:.2%} -> {d.new:.2%}  {d.delta:+.2%} "
        f"[{d.delta_ci[0]:+.1%}, {d.delta_ci[1]:+.1%}]{fmt_ci(d.new_ci)}"
    )


def _indices(rows: list[int], k: int = 10) -> str:
    return ", ".join(map(str, rows[:k])) + (
        f", ... ({len(rows) - k} more)" if len(rows) > k else ""
    )


def _as_report(obj: Report | str | os.PathLike, who: str) -> tuple[Report, str]:
    if isinstance(obj, Report):
        return obj, who
    if isinstance(obj, (str, os.PathLike)):
        if not Path(obj).is_file():
            raise InputError(f"compare: {who}: no report file {obj}")
        return Report.load(obj), str(obj)
    raise InputError(
        f"compare: {who}: expected a Report or a report file, got {type(obj).__name__}"
    )


def _side(r: Report, label: str) -> Side:
    return Side(
        label=label,
        model=r.model.name_given or r.model.name,
        sha256=r.model.sha256,
        weights_sha256=r.model.weights_sha256,
        created=r.created,
        reliable=r.reliable,
    )


def _delta_of(k_base: int, n_base: int, k_new: int, n_new: int, level: float) -> Delta:
    pb = k_base / n_base if n_base else 0.0
    pn = k_new / n_new if n_new else 0.0
    return Delta(
        base=round(pb, 6),
        new=round(pn, 6),
        delta=round(pn - pb, 6),
        base_ci=wilson(k_base, n_base, level=level),
        new_ci=wilson(k_new, n_new, level=level),
        delta_ci=newcombe(k_base, n_base, k_new, n_new, level=level),
    )


def check_comparable(
    base: Report,
    *,
    data: DataInfo | None = None,
    threat: dict[str, Any] | None = None,
    suite: dict[str, Any] | None = None,
    base_label: str = "base",
    new_label: str = "new",
) -> None:
    """Refuse (InputError, naming what differs) when the data, threat model or suite of another
    audit differ from ``base``'s: the numbers would not measure the same thing. Each piece is
    checked when given (``advx audit --baseline`` checks the threat and suite before any work)."""
    bl, nl = base_label, new_label
    problems = []
    if data is not None and (base.data.sha256 != data.sha256 or base.data.n != data.n):
        problems.append(
            f"the data differ ({base.data.name or '?'}, {base.data.n} samples, sha256 "
            f"{base.data.sha256[:12]} in {bl}; {data.name or '?'}, {data.n} samples, "
            f"sha256 {data.sha256[:12]} in {nl})"
        )
    tb = encode(base.threat)
    if threat is not None and tb != threat:
        problems.append(
            f"the threat models differ ({_threat(tb)} in {bl}; {_threat(threat)} in {nl})"
        )
    sb = encode(base.suite)
    if suite is not None and json.dumps(sb, sort_keys=True) != json.dumps(suite, sort_keys=True):
        problems.append(f"the suites differ ({sb['name']!r} in {bl}, {suite['name']!r} in {nl})")
    if problems:
        raise InputError(
            "compare: the two audits are not comparable: "
            + "; ".join(problems)
            + ". Audit the new model with the baseline's --data, --threat and --suite (and -n)."
        )


def _threat(t: dict[str, Any]) -> str:
    lo, hi = t["bounds"]
    return f"{t['norm']} eps {t['eps']:g} in [{lo:g}, {hi:g}]"


def compare(
    base: Report | str | os.PathLike,
    new: Report | str | os.PathLike,
    *,
    max_drop: float | None = None,
    level: float = LEVEL,
) -> Comparison:
    """Compare two audits of the same data, threat model and suite (reports or report files).

    ``max_drop``: the gate -- the comparison fails when robust accuracy fell by more than this
    (an absolute share: 0.01 is one point). It also fails when the new audit is not reliable
    (a sanity check found that its robust accuracy cannot be trusted). Different data, threat
    or suite raise an :class:`~advx.errors.InputError` naming what differs.
    """
    b, bl = _as_report(base, "base")
    n_, nl = _as_report(new, "new")
    if max_drop is not None and (
        isinstance(max_drop, bool)
        or not isinstance(max_drop, (int, float))
        or not 0 <= max_drop < 1
    ):
        raise InputError(f"compare: max_drop must be a share in [0, 1), got {max_drop!r}")
    check_comparable(
        b,
        data=n_.data,
        threat=encode(n_.threat),
        suite=encode(n_.suite),
        base_label=bl,
        new_label=nl,
    )
    n = b.data.n
    sb, sn = b.samples, n_.samples
    robust = _delta_of(sum(sb.robust), n, sum(sn.robust), n, level)
    clean = _delta_of(sum(sb.clean_correct), n, sum(sn.clean_correct), n, level)
    labels = stage_labels(n_.cascade)
    cascade = [
        StageDelta(
            stage=s.stage,
            attack=label,
            robust_accuracy_after=_delta_of(
                count_of(t.robust_accuracy_after, n),
                n,
                count_of(s.robust_accuracy_after, n),
                n,
                level,
            ),
        )
        for s, t, label in zip(n_.cascade, b.cascade, labels)
    ]
    base_rows = {c.label: c for c in b.per_class}
    per_class = []
    for c in n_.per_class:
        o = base_rows.get(c.label)
        if o is None:
            continue
        per_class.append(
            ClassDelta(
                label=c.label,
                n=c.n,
                clean_accuracy=_delta_of(
                    count_of(o.clean_accuracy, o.n),
                    o.n,
                    count_of(c.clean_accuracy, c.n),
                    c.n,
                    level,
                ),
                robust_accuracy=_delta_of(
                    count_of(o.robust_accuracy, o.n),
                    o.n,
                    count_of(c.robust_accuracy, c.n),
                    c.n,
                    level,
                ),
            )
        )
    newly_broken = [i for i, (a, z) in enumerate(zip(sb.robust, sn.robust)) if a and not z]
    newly_robust = [i for i, (a, z) in enumerate(zip(sb.robust, sn.robust)) if z and not a]

    checks = []
    if max_drop is not None:
        drop = -robust.delta
        ok = drop <= max_drop + _TOLERANCE
        checks.append(
            Check(
                name=f"robust accuracy drop <= {max_drop:.2%}",
                kind="regression",
                passed=ok,
                message=f"robust accuracy {robust.base:.2%} -> {robust.new:.2%} "
                f"({robust.delta:+.2%}, {level:.0%} interval [{robust.delta_ci[0]:+.1%}, "
                f"{robust.delta_ci[1]:+.1%}]); {plural(len(newly_broken), 'sample')} newly "
                f"broken"
                + ("" if ok else f": a drop of more than --max-drop {max_drop:.2%}")
                + (
                    f" (the interval holds 0: within the noise of {n} samples)"
                    if robust.delta_ci[0] <= 0 <= robust.delta_ci[1]
                    else ""
                ),
            )
        )
    checks.append(reliable_check(n_, "the new audit"))
    return Comparison(
        created=now(),
        base=_side(b, bl),
        new=_side(n_, nl),
        data=n_.data,
        threat=n_.threat,
        suite=n_.suite,
        ci_level=level,
        max_drop=max_drop,
        clean_accuracy=clean,
        robust_accuracy=robust,
        cascade=cascade,
        per_class=per_class,
        newly_broken=newly_broken,
        newly_robust=newly_robust,
        checks=checks,
        passed=all(c.passed for c in checks),
    )
