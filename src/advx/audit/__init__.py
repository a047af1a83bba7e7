"""The robustness audit: a cascade of attacks, sanity checks, an eps curve, and a report.

report = advx.audit(model, x, y, advx.Linf(0.3), suite="standard")
report.robust_accuracy, report.findings
report.save("report.json"); report.save_html("report.html")

Where things live: ``orchestrate`` (``audit()``), ``runner`` (the cascade and its per-sample
state), ``suites``, ``checks`` (the sanity checks and ``Finding``), ``eps_curve``, ``assemble``
(the report made from the cascade's state), ``report`` (the typed report, its JSON and its
schema), ``html`` (the pages), ``stats`` (confidence intervals), ``comparison`` (two audits
compared: ``compare(base, new, max_drop=0.01)``), ``gate`` (the checks, Markdown and JUnit).
"""

from .adversarial import AdversarialExamples
from .checks import Finding
from .comparison import Comparison, compare
from .gate import Check
from .orchestrate import audit
from .report import Report
from .suites import SUITES, Suite, load_suite

__all__ = [
    "audit",
    "AdversarialExamples",
    "compare",
    "Comparison",
    "Check",
    "Report",
    "Suite",
    "SUITES",
    "load_suite",
    "Finding",
]
