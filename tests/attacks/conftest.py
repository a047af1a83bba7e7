"""Fixtures of the attack tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class _RowLinear(nn.Module):
    """A linear layer computed row by row: the same bits for a row in any batch."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(1) * self.weight).sum(dim=-1) + self.bias


@pytest.fixture(scope="session")
def row_net(trained_mlp) -> nn.Module:
    """The trained MLP with each row computed on its own (products summed per row): a row's
    bits do not depend on the rows beside it, so that tests can demand identical results from
    loops that batch rows differently (a matrix-multiply kernel chosen by batch size, on this
    CPU below 8 rows, can change a row's last bits with the batch it sits in)."""
    layers = [_RowLinear(m) if isinstance(m, nn.Linear) else m for m in trained_mlp]
    return nn.Sequential(*layers).eval()


def assert_same_results(a, b) -> None:
    """Two AttackResults agree bit for bit: points, verdicts, distances and pass counts."""
    assert torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(a.success, b.success)
    assert torch.equal(a.distance, b.distance)
    assert torch.equal(a.queries, b.queries)
    assert torch.equal(a.grads, b.grads)
