"""Sizes from memory on a GPU (issue 15, item 1): how many rows fit, and an audit's unit.

No GPU here: the driver's answer (``free_bytes``) is replaced by a number; the arithmetic and
the bounds it feeds are the real ones. A CPU gets the fixed sizes, whatever its memory.
"""

from __future__ import annotations

import torch

from advx import _memory
from advx.attacks import _side
from advx.audit import runner

GPU = torch.device("cuda", 0)  # a device name only: nothing is allocated on it
MNIST = (1, 28, 28)


def test_rows_that_fit_a_share_of_free_memory(monkeypatch):
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 1_000_000)
    assert _memory.rows_that_fit(GPU, 1_000, share=0.5, at_most=10_000) == 500
    assert _memory.rows_that_fit(GPU, 1_000, share=0.5, at_most=100) == 100
    assert _memory.rows_that_fit(GPU, 10**7, share=0.5, at_least=64, at_most=10**6) == 64
    # a CPU has no bound here: the caller's largest size
    assert _memory.rows_that_fit(torch.device("cpu"), 10**12, share=0.5, at_most=77) == 77


def test_an_audit_unit_by_device(monkeypatch):
    assert runner.unit_size(torch.device("cpu"), MNIST, torch.float32) == runner.UNIT == 500
    per_sample = 28 * 28 * 4 * _side.STATE_COPIES * _side.RUNS_AT_ONCE["cuda"]
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 80 * 2**30)  # an idle H100
    assert runner.unit_size(GPU, MNIST, torch.float32) == runner.UNIT_MAX
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 2**30)
    want = int(2**30 * runner.UNIT_SHARE) // per_sample
    assert runner.UNIT < want < runner.UNIT_MAX
    assert runner.unit_size(GPU, MNIST, torch.float32) == want
    # half the bytes per sample: twice the samples
    assert runner.unit_size(GPU, MNIST, torch.float16) in (2 * want, 2 * want + 1)
    monkeypatch.setattr(_memory, "free_bytes", lambda device: 2**20)
    assert runner.unit_size(GPU, MNIST, torch.float32) == runner.UNIT  # never fewer than a CPU's
