"""The training curve of a fit run, drawn beside its checkpoint as ``training-curve.png``: the
loss, and the clean and robust accuracy per epoch (on the training batches as they were seen,
and on the monitor set), with the epoch where catastrophic overfitting stopped the run marked.

Drawn after every checkpoint (so an interrupted run has one too); without matplotlib nothing is
drawn (``pip install 'advx[report]'``).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from .saver import History

__all__ = ["CURVE_FILE", "draw_curve", "curve_figure"]

log = logging.getLogger("advx")

CURVE_FILE = "training-curve.png"

# (key in the history, label, colour, training batches: dashed, hollow markers)
_ACCURACIES = (
    ("train_clean_accuracy", "clean (training batches)", "tab:blue", True),
    ("train_adv_accuracy", "robust (training batches, the recipe's attack)", "tab:red", True),
    ("monitor_clean_accuracy", "clean (monitor set)", "tab:blue", False),
    ("monitor_adv_accuracy", "robust (monitor set, PGD)", "tab:red", False),
)


def curve_figure(history: History | dict[str, Any], *, title: str | None = None) -> Any:
    """A matplotlib Figure of the run's curves (not attached to pyplot: no global state)."""
    from matplotlib.figure import Figure

    h = history if isinstance(history, History) else History.from_dict(history)
    rows = h.epochs
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    losses = [r.get("loss") for r in rows]
    ax_loss.plot(epochs, _nan(losses), marker="o", color="black", label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (mean over the epoch's samples)")
    ax_loss.set_title("loss")
    for key, label, colour, batches in _ACCURACIES:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_acc.plot(
                epochs,
                _nan(values),
                linestyle="--" if batches else "-",
                marker="o" if batches else "s",
                markerfacecolor="white" if batches else colour,
                color=colour,
                label=label,
            )
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("accuracy")
    if h.stopped and rows and h.stopped.startswith("catastrophic overfitting"):
        at = rows[-1]["epoch"]
        for ax in (ax_loss, ax_acc):
            ax.axvline(at, color="tab:purple", linestyle=":", linewidth=2)
        ax_acc.annotate(
            f"catastrophic overfitting\nat epoch {at}: stopped,\nepoch {h.best_epoch} kept",
            xy=(at, 1.0),
            xytext=(-6, -4),
            textcoords="offset points",
            ha="right",
            va="top",
            color="tab:purple",
            fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "tab:purple", "alpha": 0.9},
        )
        if h.best_epoch is not None:
            best = next((r for r in rows if r["epoch"] == h.best_epoch), None)
            if best is not None and best.get("monitor_adv_accuracy") is not None:
                ax_acc.plot(
                    [h.best_epoch],
                    [best["monitor_adv_accuracy"]],
                    marker="*",
                    markersize=16,
                    color="tab:purple",
                    linestyle="none",
                    label=f"kept: epoch {h.best_epoch}",
                )
    elif h.stopped:  # the loss blew up
        ax_loss.set_title("loss (stopped: " + h.stopped.split(";")[0] + ")", fontsize=9)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if ax_acc.lines:
        ax_acc.legend(fontsize=8, loc="best", framealpha=0.85)
    if title:
        fig.suptitle(title)
    return fig


def draw_curve(history: History, path: str | Path) -> Path | None:
    """Write the curve to ``path`` (PNG, atomically); None when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.info("fit: matplotlib is not installed: no %s (pip install 'advx[report]')", path)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .._io import write_bytes

    fig = curve_figure(history)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())
    return Path(path)


def _nan(values: list[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]
