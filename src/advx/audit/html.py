"""Render an audit report as one self-contained HTML page.

Plots are PNGs made with matplotlib and embedded as data URIs; the page loads nothing from the
network. Needs ``pip install 'advx[report]'`` (jinja2 and matplotlib).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ._codec import png_encode
from .report import Report, stage_labels

if TYPE_CHECKING:
    from .comparison import Comparison

__all__ = ["render_html", "render_comparison", "render_diff"]


def _env():
    try:
        import jinja2
    except ImportError:
        raise InputError(
            "the HTML report needs jinja2 and matplotlib: pip install 'advx[report]'"
        ) from None
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("advx.audit", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.globals.update(zip=zip, stage_labels=stage_labels, inf=float("inf"))
    return env


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _examples(r: Report) -> list[dict[str, Any]]:
    """Per example: its stored PNGs, shown as they are, and its perturbation as a PNG (grey is
    no change; stretched to the sample's largest change, given in the input's units)."""
    lo, hi = r.threat.bounds
    rows = []
    for e in r.examples:
        clean, adv = (t.numpy().astype(np.int16) for t in e.pixels())
        delta = adv - clean
        most = int(np.abs(delta).max())
        level = np.rint(np.abs(delta) * (127 / max(most, 1)))
        level = np.where(delta != 0, np.maximum(level, 1), 0)  # every change stays visible
        rows.append(
            {
                "e": e,
                "perturbation": png_encode((128 + np.sign(delta) * level).astype(np.uint8)),
                "largest": most / 255 * (hi - lo),
            }
        )
    return rows


def _plots(r: Report) -> dict[str, str | None]:
    from .. import viz

    plots: dict[str, str | None] = {
        "curve": None,
        "cascade": None,
        "per_class": None,
    }
    curve = r.eps_curve
    if curve:
        # the legend says what the points are: the curve's attack, with the cascade's examples
        label = curve.attack + (
            " + cascade" if curve.from_cascade and any(curve.from_cascade) else ""
        )
        png = viz.line_plot(
            {label: (curve.eps, curve.robust_accuracy)},
            xlabel=f"{r.threat.norm} eps",
            ylabel="robust accuracy",
            title=f"Robust accuracy against eps (first {curve.n} of {r.data.n} samples)",
            marker=(r.threat.eps, r.robust_accuracy, f"{r.suite.name} suite"),
        )
        plots["curve"] = _uri(png)
    labels = ["clean"] + [f"{s.stage + 1}. {s.attack}" for s in r.cascade]
    values = [r.clean_accuracy] + [s.robust_accuracy_after for s in r.cascade]
    plots["cascade"] = _uri(
        viz.bar_plot(
            labels, {"accuracy": values}, ylabel="accuracy", title="Accuracy through the cascade"
        )
    )
    if r.per_class:
        plots["per_class"] = _uri(
            viz.bar_plot(
                [str(c.label) for c in r.per_class],
                {
                    "clean": [c.clean_accuracy for c in r.per_class],
                    "robust": [c.robust_accuracy for c in r.per_class],
                },
                ylabel="accuracy",
                title="Per class",
            )
        )
    return plots


def render_html(report: Report) -> str:
    """The report page: summary, findings, plots, cascade, per class, provenance."""
    return (
        _env()
        .get_template("report.html.j2")
        .render(r=report, plots=_plots(report), examples=_examples(report))
    )


def render_comparison(
    reports: list[tuple[str, Report]], title: str = "advx: audits compared"
) -> str:
    """One page comparing several audits (e.g. a standard, an adversarially trained and a
    distilled model), with each one's plots."""
    entries = [
        {"name": name, "r": r, "plots": _plots(r), "examples": _examples(r)} for name, r in reports
    ]
    return _env().get_template("compare.html.j2").render(entries=entries, title=title)


def render_diff(comparison: Comparison) -> str:
    """The page of one comparison (``advx compare --html``): checks, deltas with intervals,
    per class, the samples newly broken, both models' fingerprints. Needs jinja2 only."""
    return _env().get_template("diff.html.j2").render(c=comparison)
