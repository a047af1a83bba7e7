"""The gate's checks and how a CI job reads them: a Markdown summary (for a job summary page)
and JUnit XML (one testcase per check, for the CI's test-report view)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import atomic_open
from ._text import fmt_ci, plural
from .report import Report, stage_labels

if TYPE_CHECKING:
    from .comparison import Comparison

__all__ = ["Check", "audit_checks", "markdown", "junit", "write_text"]


@dataclass(frozen=True, kw_only=True)
class Check:
    """One condition of the gate: its name, whether it held, and what was measured."""

    name: str
    passed: bool
    message: str
    kind: str = "bar"  # "bar" (--fail-under), "regression" (--max-drop), "reliable"


def audit_checks(report: Report, *, fail_under: float | None) -> list[Check]:
    """The checks of ``advx audit --fail-under``: the bar, and the sanity checks' verdict (an
    audit that cannot be trusted passes no bar)."""
    checks = []
    if fail_under is not None:
        ok = report.robust_accuracy >= fail_under
        checks.append(
            Check(
                name=f"robust accuracy >= {fail_under:.2%}",
                passed=ok,
                message=f"robust accuracy {report.robust_accuracy:.2%}"
                f"{fmt_ci(report.robust_accuracy_ci)} is {'at or above' if ok else 'below'} "
                f"--fail-under {fail_under:.2%}",
            )
        )
    checks.append(reliable_check(report, "the audit"))
    return checks


def reliable_check(report: Report, who: str) -> Check:
    errors = [f.code for f in report.findings if f.severity == "error"]
    return Check(
        name=f"{who} is reliable",
        kind="reliable",
        passed=report.reliable,
        message="no sanity check found a reason to distrust the robust accuracy"
        if report.reliable
        else f"a sanity check says the robust accuracy cannot be trusted: {', '.join(errors)}",
    )


def _pct(v: float) -> str:
    return f"{v:.2%}"


def markdown(
    *,
    checks: list[Check],
    report: Report | None = None,
    comparison: Comparison | None = None,
) -> str:
    """A Markdown summary: the verdict, the checks, the audit's accuracies with intervals, and
    the comparison with the baseline when there is one."""
    passed = all(c.passed for c in checks)
    verdict = ("PASS" if passed else "FAIL") if checks else "no gate"
    what = "compare" if report is None else "audit"
    lines = [f"## advx {what}: {verdict}", ""]
    if report is not None:
        t = report.threat
        lines += [
            f"{report.data.name or 'data'} ({plural(report.data.n, 'sample')}), {t.norm} eps "
            f"{t.eps:g}, suite `{report.suite.name}`, model `{report.model.name_given or ''}` "
            f"`{report.model.sha256[:12]}`",
            "",
        ]
    if checks:
        lines += ["| check | result | detail |", "|---|---|---|"]
        lines += [
            f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {_cell(c.message)} |"
            for c in checks
        ]
        lines.append("")
    if report is not None:
        level = f"{report.ci_level:.0%} interval" if report.ci_level else "interval"
        lines += [f"| | accuracy | {level} |", "|---|---|---|"]
        lines.append(
            f"| clean | {_pct(report.clean_accuracy)} | {fmt_ci(report.clean_accuracy_ci)} |"
        )
        for s, label in zip(report.cascade, stage_labels(report.cascade)):
            lines.append(
                f"| after {label} | {_pct(s.robust_accuracy_after)} | "
                f"{fmt_ci(s.robust_accuracy_after_ci)} |"
            )
        lines.append(
            f"| **robust** | **{_pct(report.robust_accuracy)}** | "
            f"{fmt_ci(report.robust_accuracy_ci)} |"
        )
        lines.append("")
        for f in report.findings:
            lines.append(f"- {f.severity} `{f.code}`: {_cell(f.message)}")
        if report.findings:
            lines.append("")
    if comparison is not None:
        lines += comparison.markdown_lines()
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def junit(checks: list[Check], *, suite: str = "advx gate") -> str:
    """JUnit XML: one testsuite, one testcase per check, a <failure> for each that failed."""
    failures = sum(not c.passed for c in checks)
    root = ET.Element("testsuites", name="advx", tests=str(len(checks)), failures=str(failures))
    ts = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failures), errors="0"
    )
    for c in checks:
        case = ET.SubElement(ts, "testcase", classname=suite.replace(" ", "."), name=c.name)
        if c.passed:
            ET.SubElement(case, "system-out").text = c.message
        else:
            ET.SubElement(case, "failure", message=c.message, type="advx.gate").text = c.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically (a CI step reading the file never sees half of it)."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        f.write(text)
    return path
