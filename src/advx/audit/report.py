"""The audit report: one versioned JSON document, and the HTML page rendered from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._io import atomic_open

__all__ = ["Report", "SCHEMA"]

SCHEMA = "advx-report/1"


class Report:
    """An audit's outcome. ``to_dict()`` is the JSON document (schema ``advx-report/1``)."""

    def __init__(self, data: dict[str, Any]) -> None:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} document (schema={data.get('schema')!r})")
        self._data = data

    # ---- the numbers people ask for ------------------------------------------------------
    @property
    def clean_accuracy(self) -> float:
        return self._data["clean_accuracy"]

    @property
    def robust_accuracy(self) -> float:
        return self._data["robust_accuracy"]

    @property
    def findings(self) -> list[dict[str, Any]]:
        return self._data["findings"]

    @property
    def reliable(self) -> bool:
        """False when a sanity check found a reason not to trust the robust accuracy."""
        return not any(f["severity"] == "error" for f in self.findings)

    @property
    def cascade(self) -> list[dict[str, Any]]:
        return self._data["cascade"]

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __repr__(self) -> str:
        d = self._data
        flags = (
            ""
            if self.reliable
            else ", UNRELIABLE: "
            + ", ".join(f["code"] for f in self.findings if f["severity"] == "error")
        )
        return (
            f"Report({d['threat']['norm']} eps={d['threat']['eps']}, suite={d['suite']['name']}, n={d['data']['n']}: "
            f"clean {self.clean_accuracy:.2%}, robust {self.robust_accuracy:.2%}{flags})"
        )

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data))  # a deep copy of plain JSON types

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self._data, indent=indent)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_open(path, "w") as f:
            f.write(self.to_json())
            f.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        return cls(json.loads(Path(path).read_text()))

    def to_html(self) -> str:
        from .html import render_html

        return render_html(self._data)

    def save_html(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        page = self.to_html()
        with atomic_open(path, "w") as f:
            f.write(page)
        return path

    def summary_lines(self) -> list[str]:
        """A few lines for a terminal."""
        d = self._data
        lines = [
            f"clean accuracy  {self.clean_accuracy:.2%}   robust accuracy  {self.robust_accuracy:.2%}   "
            f"({d['data']['n']} samples, {d['threat']['norm']} eps {d['threat']['eps']}, suite {d['suite']['name']})"
        ]
        for row in d["cascade"]:
            lines.append(
                f"  after {row['attack']:<28} {row['robust_accuracy_after']:.2%}   "
                f"(broke {row['broke']}, {row['queries']:,} fwd / {row['grads']:,} bwd, {row['seconds']:.1f}s"
                + (
                    f"; on the {row['gate']['attacked']} closest to the boundary"
                    if row.get("gate")
                    else ""
                )
                + ")"
            )
        for f in self.findings:
            lines.append(f"  [{f['severity']}] {f['code']}: {f['message']}")
        return lines
