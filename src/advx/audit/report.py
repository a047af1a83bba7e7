"""The audit report as typed data: one versioned JSON document, its JSON Schema, its HTML page.

``Report`` and the dataclasses it is made of mirror the JSON document field for field
(``report.schema.json`` in this package describes it; ``advx schema report`` prints it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_open, read_json
from ..errors import InputError
from ._codec import decode, encode, png_decode, png_encode
from ._text import fmt_ci, plural
from .adversarial import AdversarialExamples
from .checks import Finding

__all__ = [
    "SCHEMA",
    "Report",
    "ModelInfo",
    "DataInfo",
    "ThreatInfo",
    "SuiteInfo",
    "Gate",
    "Stage",
    "ClassRow",
    "EpsCurve",
    "Samples",
    "Seconds",
    "Totals",
    "Example",
    "image_uri",
    "Provenance",
    "json_schema",
]

SCHEMA = "advx-report/2"
# what Report.load still reads: /1 held the example images as nested 8-bit lists (C, H, W)
OLD_SCHEMAS = ("advx-report/1",)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str  # repr of the audited model
    sha256: str  # Model.fingerprint(): weights and input space
    weights: str | None = None  # the weights file, when the caller names it
    weights_sha256: str | None = None
    name_given: str | None = None  # how the caller named the model (e.g. the CLI's --model)


@dataclass(frozen=True, kw_only=True)
class DataInfo:
    name: str | None
    n: int
    sha256: str  # of the inputs and labels


@dataclass(frozen=True, kw_only=True)
class ThreatInfo:
    norm: str
    eps: float
    bounds: list[float]


@dataclass(frozen=True, kw_only=True)
class SuiteInfo:
    name: str
    attacks: list[dict[str, Any]]  # each {"name": ..., **parameters as given}


@dataclass(frozen=True, kw_only=True)
class Gate:
    """A stage that ran only on the samples still robust closest to the decision boundary."""

    closest: float  # the share of those samples it ran on
    margin_at_most: float  # their logit margin was at most this
    attacked: int


@dataclass(frozen=True, kw_only=True)
class Stage:
    stage: int
    attack: str
    params: dict[str, Any]  # every parameter, defaults included
    broke: int
    robust_accuracy_after: float
    robust_accuracy_after_ci: list[float] | None = None  # Wilson interval [low, high]
    queries: int  # forward passes, all samples together
    grads: int  # backward passes
    seconds: float
    gate: Gate | None = None


@dataclass(frozen=True, kw_only=True)
class ClassRow:
    label: int = field(metadata={"json": "class"})
    n: int
    clean_accuracy: float
    robust_accuracy: float
    clean_accuracy_ci: list[float] | None = None  # Wilson intervals [low, high]
    robust_accuracy_ci: list[float] | None = None


@dataclass(frozen=True, kw_only=True)
class EpsCurve:
    eps: list[float]
    robust_accuracy: list[float]
    n: int  # on the first n samples
    robust_accuracy_ci: list[list[float]] | None = None  # a Wilson interval at each eps
    attack: str
    # "runs" (one attack per eps), "minimum-norm" (one run's distances) or "mixed" (min-norm
    # below the audited eps, the cascade at it, runs above it)
    source: str
    large_eps: float | None = None  # an eps that allows any input, where accuracy must be ~0
    robust_accuracy_large_eps: float | None = None
    check: bool = True  # whether the curve-shape sanity checks apply to it
    # how each point was obtained: "min-norm fmn" (from one run's distances), "cascade" (its
    # verdict at the audited eps) or "apgd-ce at eps" (a run at that eps), then "+ ..." for the
    # other ways whose adversarial examples lowered it; None in older reports
    method: list[str] | None = None
    from_cascade: list[int] | None = None  # per point, samples only the cascade broke within eps
    # the cascade's robust accuracy on the same n samples at the audited eps: the curve never
    # sits above it there, and sits under it by broken_beyond_cascade / n
    robust_accuracy_cascade: float | None = None
    broken_beyond_cascade: int | None = None  # robust by the cascade, broken by the curve's attack


@dataclass(frozen=True, kw_only=True)
class Samples:
    """Per sample, in the order of the audited batch."""

    label: list[int]
    clean_pred: list[int]
    clean_correct: list[bool]
    robust: list[bool]
    broken_by: list[int]  # the stage that broke it, -1 for none
    distance: list[float | None]  # of its adversarial example, None when not broken
    queries: list[int]
    grads: list[int]


@dataclass(frozen=True, kw_only=True)
class Seconds:
    cascade: float
    checks: float
    eps_curve: float
    total: float


@dataclass(frozen=True, kw_only=True)
class Totals:
    queries: int
    grads: int
    queries_per_robust_point: float
    grads_per_robust_point: float
    seconds: Seconds


@dataclass(frozen=True, kw_only=True)
class Example:
    """A broken sample, its images as lossless 8-bit PNG data URIs (``data:image/png;base64,``;
    greyscale or RGB; the model's bounds mapped to 0..255) that a page shows as they are."""

    index: int
    label: int
    adversarial_label: int
    attack: str
    distance: float
    clean: str
    adversarial: str

    def pixels(self) -> tuple[Tensor, Tensor]:
        """The clean and the adversarial image as uint8 tensors (C, H, W)."""
        where = f"example {self.index}"
        return (
            torch.from_numpy(png_decode(self.clean, f"{where}.clean")),
            torch.from_numpy(png_decode(self.adversarial, f"{where}.adversarial")),
        )


def image_uri(pixels: Tensor) -> str:
    """The PNG data URI of an 8-bit image (uint8, shape (1 or 3, H, W)) for :class:`Example`."""
    return png_encode(pixels.detach().cpu().numpy())


def _upgrade(data: dict[str, Any], where: str) -> dict[str, Any]:
    """An ``advx-report/1`` document as ``advx-report/2``: its images' nested lists as PNGs.
    An example whose input was no greyscale or RGB image (say a row of features) is left out,
    as advx leaves it out of the reports it writes now."""
    examples = data.get("examples")
    if not isinstance(examples, list):
        return {**data, "schema": SCHEMA}  # decode() names what is wrong
    out = []
    for i, e in enumerate(examples):
        if not isinstance(e, dict):
            out.append(e)
            continue
        e = dict(e)
        images = {
            key: _pixels(e[key], f"{where}.examples[{i}].{key}")
            for key in ("clean", "adversarial")
            if key in e
        }
        if any(a.ndim != 3 or a.shape[0] not in (1, 3) for a in images.values()):
            continue
        out.append({**e, **{key: png_encode(a) for key, a in images.items()}})
    return {**data, "schema": SCHEMA, "examples": out}


def _pixels(value: Any, where: str) -> np.ndarray:
    """An advx-report/1 image: 8-bit values in nested lists."""
    try:
        a = np.asarray(value)
    except ValueError:
        a = np.asarray("ragged")
    if a.ndim == 0 or a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 255:
        raise InputError(f"{where}: expected 8-bit pixel values (integers 0..255) in nested lists")
    return a.astype(np.uint8)


@dataclass(frozen=True, kw_only=True)
class Provenance:
    advx: str
    torch: str
    python: str
    platform: str
    threads: int
    device: str | None = None
    seed: int | None = None
    processes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, metadata={"rest": True})  # the caller's

    def rows(self) -> list[tuple[str, Any]]:
        """(key, value) in the document's order, the caller's keys included."""
        return list(encode(self).items())


class Page:
    """A document that renders to one self-contained HTML page (a report, a comparison)."""

    def to_html(self) -> str:
        raise NotImplementedError

    def save_html(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_html` to ``path`` atomically; returns the path."""
        path = Path(path)
        page = self.to_html()
        with atomic_open(path, "w") as f:
            f.write(page)
        return path


@dataclass(frozen=True, kw_only=True)
class Report(Page):
    """An audit's outcome. ``to_dict()`` is the JSON document (schema ``advx-report/2``;
    :meth:`load` also reads ``advx-report/1`` files)."""

    schema: str = SCHEMA
    created: str
    model: ModelInfo
    data: DataInfo
    threat: ThreatInfo
    suite: SuiteInfo
    clean_accuracy: float
    robust_accuracy: float
    # Wilson score intervals [low, high] at ci_level (absent from reports of advx before them)
    clean_accuracy_ci: list[float] | None = None
    robust_accuracy_ci: list[float] | None = None
    ci_level: float | None = None
    reliable: bool  # False when a sanity check found a reason not to trust robust_accuracy
    cascade: list[Stage]
    per_class: list[ClassRow]
    eps_curve: EpsCurve | None
    samples: Samples
    totals: Totals
    findings: list[Finding]
    examples: list[Example]
    provenance: Provenance
    # every adversarial example, in memory only (audit(..., return_adv=True)); not in the JSON
    adversarial: AdversarialExamples | None = field(
        default=None, repr=False, compare=False, metadata={"memory": True}
    )

    @property
    def x_adv(self) -> Tensor | None:
        """The adversarial inputs of the broken samples (``adversarial.index`` says which)."""
        return None if self.adversarial is None else self.adversarial.x_adv

    def __repr__(self) -> str:
        flags = (
            ""
            if self.reliable
            else ", UNRELIABLE: "
            + ", ".join(f.code for f in self.findings if f.severity == "error")
        )
        return (
            f"Report({self.threat.norm} eps={self.threat.eps}, suite={self.suite.name}, "
            f"n={self.data.n}: clean {self.clean_accuracy:.2%}, "
            f"robust {self.robust_accuracy:.2%}{flags})"
        )

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document, as fresh plain JSON types."""
        return encode(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "report") -> Report:
        """The report a JSON document describes; an error names what does not fit."""
        if isinstance(data, dict) and data.get("schema") in OLD_SCHEMAS:
            data = _upgrade(data, where)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise InputError(
                f"{where}: not an {SCHEMA} document (schema: {found!r}; this advx reads "
                f"{', '.join((SCHEMA, *OLD_SCHEMAS))})"
            )
        return decode(cls, data, where)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_open(path, "w") as f:
            f.write(self.to_json())
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        return cls.from_dict(read_json(path, name="report"), where=str(path))

    def to_html(self) -> str:
        from .html import render_html

        return render_html(self)

    def summary_lines(self) -> list[str]:
        """A few lines for a terminal."""
        t = self.threat
        level = f"{self.ci_level:.0%} " if self.ci_level else ""
        lines = [
            f"clean accuracy  {self.clean_accuracy:.2%}{fmt_ci(self.clean_accuracy_ci)}   "
            f"robust accuracy  {self.robust_accuracy:.2%}{fmt_ci(self.robust_accuracy_ci)}   "
            f"({plural(self.data.n, 'sample')}, {t.norm} eps {t.eps}, suite {self.suite.name}"
            + (f"; {level}Wilson intervals" if self.robust_accuracy_ci else "")
            + ")"
        ]
        labels = stage_labels(self.cascade)
        for s, label in zip(self.cascade, labels):
            gate = f"; on the {s.gate.attacked} closest to the boundary" if s.gate else ""
            lines.append(
                f"  after {label:<28} {s.robust_accuracy_after:.2%}"
                f"{fmt_ci(s.robust_accuracy_after_ci)}   "
                f"(broke {s.broke}, {s.queries:,} fwd / {s.grads:,} bwd, {s.seconds:.1f}s{gate})"
            )
        curve = self.eps_curve
        if curve is not None:
            lines.append(
                "  eps curve  "
                + "  ".join(f"{e:.4g}: {a:.1%}" for e, a in zip(curve.eps, curve.robust_accuracy))
            )
            lines += [f"    {note}" for note in self.curve_notes()]
        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.code}: {f.message}")
        return lines

    def curve_notes(self) -> list[str]:
        """What the eps curve is and why it may differ from the headline, in sentences (the HTML
        page and the terminal summary both show them); [] without a curve."""
        c = self.eps_curve
        if c is None:
            return []
        eps0 = self.threat.eps
        first = f"the first {plural(c.n, 'sample')} of {self.data.n:,}"
        if c.source == "mixed":
            how = (
                f"On {first}, each point obtained the cheapest way that holds up (the row "
                f"'obtained by' says which): below the audited eps from one minimum-norm run "
                f"({c.attack.split(', ')[0]}; a sample counts as robust at eps when the smallest "
                "adversarial perturbation it found is larger), at it the cascade's own verdict, "
                "above it one fixed-eps attack run per eps"
                + (f" ({c.attack.split(', ')[1]})" if ", " in c.attack else "")
                + "."
            )
        elif c.source == "minimum-norm":
            how = (
                f"From one minimum-norm attack, {c.attack}, on {first}: a sample counts as "
                "robust at eps when the smallest adversarial perturbation it found is larger "
                "than eps, so one run gives every point (and the curve can only fall)."
            )
        else:
            how = (
                f"One {c.attack} run per eps on {first}: each point is a separate fixed-eps "
                "attack, cheaper and much weaker than the cascade."
            )
        notes = [how]
        if c.method is None:  # a report written before advx combined the curve with the cascade
            notes.append(
                "Its points come from that attack alone: at the audited eps it can sit above the "
                "headline robust accuracy (a weaker attack) or below it (other samples)."
            )
            return notes
        notes.append(
            "Every adversarial example found counts at every eps it fits in, the cascade's "
            "included ('+ ...' names another way that lowered a point), so no point claims "
            "robust what the audit broke. Like the headline, every point is an upper bound on "
            "the true robust accuracy: a stronger attack can only lower it."
        )
        at = [i for i, e in enumerate(c.eps) if math.isclose(e, eps0, rel_tol=1e-6, abs_tol=1e-12)]
        if at and c.robust_accuracy_cascade is not None:
            here = c.robust_accuracy[at[0]]
            base = c.robust_accuracy_cascade
            text = (
                f"At the audited eps {eps0:.4g} the curve reads {here:.1%}; the cascade measured "
                f"{base:.1%} on the same samples"
                + (
                    f" and {self.robust_accuracy:.1%} on all {self.data.n:,} (the headline; the "
                    "difference between those two is which samples were drawn)"
                    if c.n != self.data.n
                    else " (the headline)"
                )
                + "."
            )
            if c.broken_beyond_cascade:
                text += (
                    f" The curve's attacks broke {plural(c.broken_beyond_cascade, 'sample')} "
                    "within that eps that the cascade left robust: the headline overstates "
                    "robustness; rerun with a stronger suite."
                )
            else:
                text += " The curve's attacks broke nothing there that the cascade missed."
            notes.append(text)
        if c.large_eps is not None and c.robust_accuracy_large_eps is not None:
            notes.append(
                f"At eps {c.large_eps:.4g} any input is allowed, so robust accuracy must be about "
                f"0: it reads {c.robust_accuracy_large_eps:.1%}."
            )
        return notes


# the parameters that tell two stages of the same attack apart, in the order they are shown
_DISTINGUISHING = ("loss", "targeted", "targets", "norm", "steps", "queries", "restarts")


def stage_labels(cascade: list[Stage]) -> list[str]:
    """A name per stage that tells apart the stages of one attack: ``apgd (loss=ce)`` and
    ``apgd (loss=dlr-targeted, targets=3)`` rather than ``apgd`` twice."""
    labels = []
    for s in cascade:
        twins = [t for t in cascade if t.attack == s.attack]
        if len(twins) == 1:
            labels.append(s.attack)
            continue
        differ = [
            k
            for k in dict.fromkeys([*_DISTINGUISHING, *s.params])
            if k != "seed" and len({repr(t.params.get(k)) for t in twins}) > 1
        ]
        shown = [k for k in differ if k in s.params][:2]
        if shown:
            labels.append(f"{s.attack} ({', '.join(f'{k}={s.params[k]}' for k in shown)})")
        else:
            labels.append(f"{s.attack} #{s.stage + 1}")
    return labels


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the report document (``report.schema.json``, shipped with advx)."""
    text = resources.files("advx.audit").joinpath("report.schema.json").read_text()
    return json.loads(text)
