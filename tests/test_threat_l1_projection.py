"""The exact L1-and-box projection where the ball keeps many coordinates: the walk over the
largest breakpoints must widen (64, 128, ... of the 2D) per sample until it reaches lam."""

from __future__ import annotations

import torch

from advx.threat import _project_l1_box


def _bisection(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float) -> torch.Tensor:
    a, cap = v.abs(), torch.where(v >= 0, hi, -lo)

    def size(lam: float) -> float:
        return float(torch.minimum((a - lam).clamp(min=0), cap).sum())

    if size(0.0) <= eps:
        return v.sign() * torch.minimum(a, cap)
    left, right = 0.0, float(a.max())
    for _ in range(200):
        m = (left + right) / 2
        left, right = (m, right) if size(m) > eps else (left, m)
    return v.sign() * torch.minimum((a - right).clamp(min=0), cap)


def test_l1_projection_with_few_and_with_hundreds_of_active_coordinates():
    g = torch.Generator().manual_seed(0)
    d = 784
    x = torch.rand(6, d, generator=g, dtype=torch.float64) * (torch.rand(6, d, generator=g) > 0.7)
    v = torch.randn(6, d, generator=g, dtype=torch.float64) * 0.2
    # from a handful of active coordinates (lam among the top 64 breakpoints) to nearly all of
    # them (lam below the first 64, 128 and 256), and one sample inside the ball already
    eps = torch.tensor([0.5, 5.0, 20.0, 60.0, 100.0, 1e4], dtype=torch.float64)
    got = _project_l1_box(v, -x, 1 - x, eps)
    for i in range(len(x)):
        ref = _bisection(v[i], -x[i], 1 - x[i], float(eps[i]))
        assert torch.allclose(got[i], ref, atol=1e-9)
        active = int((ref != 0).sum())
        assert active >= {0: 1, 1: 20, 2: 60, 3: 150, 4: 250, 5: 450}[i]
    assert bool((got.abs().sum(1) <= eps + 1e-9).all())
