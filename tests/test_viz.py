"""Pictures: the example grid's perturbation panels carry a colour bar in the input's units."""

from __future__ import annotations

import pytest
import torch

from advx import viz

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("channels", [1, 3])
def test_each_perturbation_panel_has_a_colour_bar_spanning_its_largest_change(channels):
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, channels, 8, 8, generator=g)
    scales = [0.05, 0.1, 0.3]
    xa = x.clone()
    for i, s in enumerate(scales):
        xa[i, 0, 0, 0] = x[i, 0, 0, 0] + s  # the largest change of sample i is s
    fig = viz._grid_figure(x, [("adv", xa, None)], row_labels=None, bounds=(0.0, 1.0))
    try:
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(bars) == 3  # one per perturbation panel, none beside the images
        for bar, s in zip(bars, scales):
            low, high = sorted(bar.get_ylim())
            assert low == pytest.approx(-s, rel=1e-4) and high == pytest.approx(s, rel=1e-4)
            labels = [t.get_text() for t in bar.get_yticklabels()]
            assert labels == [f"{-s:+.2g}", "0", f"{s:+.2g}"]
    finally:
        plt.close(fig)
    png = viz.example_grid(x, [("adv", xa, None)])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
