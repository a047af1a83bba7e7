"""One context manager restores every submodule's mode, also on error."""

import pytest
import torch
from torch import nn

from advx._state import evaluating


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Linear(2, 2)))
    net.train()
    net[2].eval()  # a user froze a submodule on purpose: it must stay frozen
    return net


def test_eval_for_the_duration_and_each_submodule_restored():
    net = _net()
    before = [m.training for m in net.modules()]
    with evaluating(net):
        assert not any(m.training for m in net.modules())
        assert torch.is_grad_enabled()
    assert [m.training for m in net.modules()] == before


def test_restored_on_error_and_no_grad_on_request():
    net = _net()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError), evaluating([net], no_grad=True):
        assert not torch.is_grad_enabled()
        raise RuntimeError("boom")
    assert torch.is_grad_enabled()
    assert [m.training for m in net.modules()] == before
