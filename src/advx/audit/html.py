"""Render an audit report (the JSON document) as one self-contained HTML page.

Plots are PNGs made with matplotlib and embedded as data URIs; the page loads nothing from the
network. Needs ``pip install 'advx[report]'`` (jinja2 and matplotlib).
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from ..errors import InputError

__all__ = ["render_html", "render_comparison"]


def _env():
    try:
        import jinja2
    except ImportError:
        raise InputError(
            "the HTML report needs jinja2 and matplotlib: pip install 'advx[report]'"
        ) from None
    return jinja2.Environment(
        loader=jinja2.PackageLoader("advx.audit", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plots(d: dict[str, Any]) -> dict[str, str]:
    from .. import viz

    plots: dict[str, str | None] = {
        "curve": None,
        "cascade": None,
        "per_class": None,
        "examples": None,
    }
    eps = d["threat"]["eps"]
    curve = d.get("eps_curve")
    if curve:
        series = {curve.get("attack", "attack"): (curve["eps"], curve["robust_accuracy"])}
        png = viz.line_plot(
            series,
            xlabel=f"{d['threat']['norm']} eps",
            ylabel="robust accuracy",
            title=f"Robust accuracy against eps (first {curve['n']} samples)",
            marker=(eps, d["robust_accuracy"], f"{d['suite']['name']} suite"),
        )
        plots["curve"] = _uri(png)
    labels = ["clean"] + [f"{r['stage'] + 1}. {r['attack']}" for r in d["cascade"]]
    values = [d["clean_accuracy"]] + [r["robust_accuracy_after"] for r in d["cascade"]]
    plots["cascade"] = _uri(
        viz.bar_plot(
            labels, {"accuracy": values}, ylabel="accuracy", title="Accuracy through the cascade"
        )
    )
    if d["per_class"]:
        cls = [str(r["class"]) for r in d["per_class"]]
        plots["per_class"] = _uri(
            viz.bar_plot(
                cls,
                {
                    "clean": [r["clean_accuracy"] for r in d["per_class"]],
                    "robust": [r["robust_accuracy"] for r in d["per_class"]],
                },
                ylabel="accuracy",
                title="Per class",
            )
        )
    if d["examples"]:
        ex = d["examples"]
        x = torch.tensor([e["clean"] for e in ex], dtype=torch.float32) / 255
        xa = torch.tensor([e["adversarial"] for e in ex], dtype=torch.float32) / 255
        captions = [
            f"{e['label']} -> {e['adversarial_label']} ({e['attack']}, {e['distance']:.3g})"
            for e in ex
        ]
        plots["examples"] = _uri(
            viz.example_grid(
                x, [("adversarial", xa, captions)], row_labels=[f"#{e['index']}" for e in ex]
            )
        )
    return plots


def render_html(d: dict[str, Any]) -> str:
    """The report page: summary, findings, plots, cascade, per class, provenance."""
    return _env().get_template("report.html.j2").render(r=d, plots=_plots(d))


def render_comparison(
    reports: list[tuple[str, dict[str, Any]]], title: str = "advx: audits compared"
) -> str:
    """One page comparing several audits (e.g. a standard, an adversarially trained and a
    distilled model), with each one's plots."""
    entries = [{"name": name, "r": d, "plots": _plots(d)} for name, d in reports]
    return _env().get_template("compare.html.j2").render(entries=entries, title=title)
