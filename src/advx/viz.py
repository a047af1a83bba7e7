"""Pictures: a grid of clean / adversarial / perturbation images, and simple curves.

Needs matplotlib (``pip install 'advx[report]'``), imported only when a picture is made.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from torch import Tensor

from .errors import InputError

__all__ = ["example_grid", "have_matplotlib", "line_plot", "bar_plot"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("pictures need matplotlib: pip install 'advx[report]'") from None
    return plt


def _to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _image(t: Tensor):
    t = t.detach().float().cpu()
    if t.dim() == 3 and t.shape[0] in (1, 3):
        t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if t.dim() == 3 and t.shape[2] == 1:
        t = t[:, :, 0]
    return t.numpy()


def example_grid(
    x: Tensor,
    columns: Sequence[tuple[str, Tensor, Sequence[str] | None]],
    *,
    row_labels: Sequence[str] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> bytes:
    """A PNG: one row per sample; the clean image, then for each (title, x_adv, captions) the
    adversarial image and its perturbation, with a colour bar in the input's units (each
    perturbation spans the bar's full range: ``max |x_adv - x|`` of that sample)."""
    return _to_png(_grid_figure(x, columns, row_labels=row_labels, bounds=bounds))


def _grid_figure(
    x: Tensor,
    columns: Sequence[tuple[str, Tensor, Sequence[str] | None]],
    *,
    row_labels: Sequence[str] | None,
    bounds: tuple[float, float],
):
    """The matplotlib figure of :func:`example_grid` (the caller closes it)."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = x.shape[0]
    ncols = 1 + 2 * len(columns)
    fig, axes = plt.subplots(n, ncols, figsize=(1.25 * ncols, 1.3 * n + 0.3), squeeze=False)
    lo, hi = bounds
    for i in range(n):
        ax = axes[i][0]
        ax.imshow(_image((x[i] - lo) / (hi - lo)), cmap="gray", vmin=0, vmax=1)
        if row_labels is not None:
            ax.set_ylabel(row_labels[i], fontsize=8)
        for k, (title, xa, captions) in enumerate(columns):
            delta = (xa[i] - x[i]).float()
            scale = float(delta.abs().max()) or 1.0
            a1, a2 = axes[i][1 + 2 * k], axes[i][2 + 2 * k]
            a1.imshow(_image((xa[i] - lo) / (hi - lo)), cmap="gray", vmin=0, vmax=1)
            if delta.dim() == 3 and delta.shape[0] == 1:
                # one channel: diverging colours, the bar in the input's own units
                shown = a2.imshow(_image(delta), cmap="RdBu_r", vmin=-scale, vmax=scale)
            else:
                # colour: each channel's change as that channel's intensity (mid-grey: none), so
                # the bar reads per channel, in grey
                a2.imshow(_image(delta / (2 * scale) + 0.5), vmin=0, vmax=1)
                shown = ScalarMappable(Normalize(-scale, scale), cmap="gray")
            bar = fig.colorbar(shown, ax=a2, fraction=0.046, pad=0.03)
            bar.set_ticks([-scale, 0.0, scale])
            bar.set_ticklabels([f"{-scale:+.2g}", "0", f"{scale:+.2g}"])
            bar.ax.tick_params(labelsize=5, length=2, pad=1)
            if captions is not None:
                a1.set_xlabel(captions[i], fontsize=7)
            if i == 0:
                a1.set_title(title, fontsize=8)
                a2.set_title("perturbation", fontsize=8)
        if i == 0:
            axes[i][0].set_title("clean", fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = (0.0, 1.0),
    marker: tuple[float, float, str] | None = None,
    points: bool = True,
) -> bytes:
    """A PNG with one line per named series of (x values, y values), and an optional single
    labelled point (e.g. the full cascade's result at the audited eps). ``points=False`` draws
    the lines without a marker at each value (for dense curves)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if points else None, markersize=3, label=name)
    if marker is not None:
        ax.plot(
            [marker[0]],
            [marker[1]],
            marker="*",
            markersize=11,
            linestyle="none",
            color="crimson",
            label=marker[2],
        )
        series = {**series, marker[2]: ([], [])}
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _to_png(fig)


def bar_plot(
    labels: Sequence[str],
    values: dict[str, Sequence[float]],
    *,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> bytes:
    """A PNG of grouped bars: one group per label, one bar per named series."""
    plt = _pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(labels) * max(1, len(values)) + 1.5), 3.2))
    width = 0.8 / max(1, len(values))
    pos = np.arange(len(labels))
    for k, (name, ys) in enumerate(values.items()):
        ax.bar(pos + k * width - 0.4 + width / 2, list(ys), width, label=name)
    ax.set_xticks(pos)
    ax.set_xticklabels(
        labels,
        rotation=30 if max(map(len, labels), default=0) > 6 else 0,
        ha="right" if max(map(len, labels), default=0) > 6 else "center",
        fontsize=8,
    )
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    if len(values) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _to_png(fig)
