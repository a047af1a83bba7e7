"""Reading ahead (advx.data.prefetch): the items in order, errors where they belong, a reader
that stops when its consumer does, and no pinned memory for a model on the CPU."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import advx
from advx.audit import runner
from advx.data.prefetch import Mover, prefetch
from advx.data.sources import as_source

EPS = 0.1


def test_prefetch_gives_the_items_in_order_reading_one_ahead_in_another_thread():
    read_by: list[str] = []
    claimed: list[int] = []

    def items():
        for i in range(5):
            read_by.append(threading.current_thread().name)
            yield i

    out = []
    for i in prefetch(items()):
        claimed.append(len(read_by))
        out.append(i)
        time.sleep(0.02)  # the reader gets ahead while the caller "works"
    assert out == [0, 1, 2, 3, 4]
    # the first item in the caller's thread (a DataLoader starts its workers there), the rest
    # in the reader's
    assert read_by[0] == threading.current_thread().name
    assert set(read_by[1:]) == {"advx-prefetch"}
    # while the caller held item i, item i + 1 was already read (never more than 2 ahead)
    assert all(c >= i + 2 or c == 5 for i, c in enumerate(claimed))
    assert all(c <= i + 3 for i, c in enumerate(claimed))
    assert list(prefetch(iter([]))) == []


def test_an_error_while_reading_reaches_the_caller_at_its_item():
    def items():
        yield 1
        yield 2
        raise ValueError("row 2 is unreadable")

    got = []
    with pytest.raises(ValueError, match="row 2 is unreadable"):
        for i in prefetch(items()):
            got.append(i)
    assert got == [1, 2]


def test_closing_the_consumer_stops_the_reader_and_closes_the_source():
    read, closed = [], []

    def items():
        try:
            for i in range(1000):
                read.append(i)
                yield i
        finally:
            closed.append(threading.current_thread().name)

    ahead = prefetch(items())
    assert next(ahead) == 0
    time.sleep(0.1)
    ahead.close()
    assert len(read) <= 3  # one handed over, one waiting, one being read at most
    assert closed  # the source's own cleanup ran (a DataLoader's workers)
    assert not any(t.name == "advx-prefetch" for t in threading.enumerate())


def test_a_cpu_model_neither_pins_nor_copies(trained_mlp, mnist_test, monkeypatch):
    mover = Mover("cpu")
    x = torch.rand(3, 4)
    moved = mover.receive(mover.send(x))
    assert moved is x  # no copy at all

    def refuse(self, *a, **k):
        raise AssertionError("pinned memory on a CPU-only run")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    x, y = mnist_test
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=16)
    r = advx.audit(
        trained_mlp,
        loader,
        advx.Linf(EPS),
        suite=[advx.FGSM(advx.Linf(EPS))],
        eps_curve=None,
        checks=False,
        batch_size=7,
    )
    assert r.data.n == 40


@pytest.mark.parametrize("bs", [1, 37])
def test_reading_ahead_or_in_turn_gives_the_same_per_sample_results(
    trained_mlp, mnist_test, monkeypatch, bs
):
    x, y = mnist_test
    x, y = x[:80], y[:80]
    kw = dict(
        suite=[advx.FGSM(advx.Linf(EPS)), {"name": "pgd", "steps": 3, "closest": 0.5}],
        eps_curve=None,
        checks=False,
        batch_size=bs,
    )
    ahead = advx.audit(
        trained_mlp, DataLoader(TensorDataset(x, y), batch_size=16), advx.Linf(EPS), **kw
    )
    monkeypatch.setattr(runner, "PREFETCH", False)
    in_turn = advx.audit(
        trained_mlp, DataLoader(TensorDataset(x, y), batch_size=16), advx.Linf(EPS), **kw
    )
    assert 0 < ahead.robust_accuracy < ahead.clean_accuracy
    assert ahead.samples == in_turn.samples


def test_whole_runs_of_a_batch_are_handed_out_as_views_and_others_as_copies():
    x = torch.arange(60.0).view(20, 3) / 60
    y = torch.arange(20) % 3
    src = as_source(DataLoader(TensorDataset(x, y), batch_size=8))
    src.scan()
    chunks = list(src.select(torch.arange(4, 20), batch_size=4))
    assert [c[1].tolist() for c in chunks] == [
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
        [16, 17, 18, 19],
    ]
    for _, rows, xb, yb in chunks:
        assert torch.equal(xb, x[rows]) and torch.equal(yb, y[rows])
        # a view into the loader's batch (8 rows; the last one 4): nothing copied
        assert xb.untyped_storage().nbytes() == (8 if rows[0] < 16 else 4) * 3 * 4
    gaps = torch.tensor([0, 2, 3, 9, 15, 19])
    got = list(src.select(gaps, batch_size=4))
    assert torch.equal(torch.cat([c[2] for c in got]), x[gaps])
    assert torch.equal(torch.cat([c[3] for c in got]), y[gaps])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_model_reads_cpu_chunks_through_pinned_memory_with_the_same_results(
    trained_mlp, mnist_test
):
    import copy

    x, y = mnist_test
    x, y = x[:80], y[:80]
    kw = dict(suite=[advx.FGSM(advx.Linf(EPS))], eps_curve=None, checks=False, batch_size=37)
    gpu = copy.deepcopy(trained_mlp).cuda()
    on_gpu = advx.audit(gpu, x.cuda(), y.cuda(), advx.Linf(EPS), **kw)
    streamed = advx.audit(gpu, DataLoader(TensorDataset(x, y), batch_size=16), advx.Linf(EPS), **kw)
    assert streamed.samples == on_gpu.samples
    sent = Mover("cuda").send(x[:4])
    assert sent[1] is not None and sent[0].is_cuda


def test_a_source_that_changes_its_order_is_refused_through_the_reader(trained_mlp, mnist_test):
    x, y = mnist_test
    x, y = x[:30], y[:30]

    class Shifty:
        """Batches in order until the scan has read them (as_source calls iter() once to tell a
        one-shot iterator, the scan once more), reversed afterwards."""

        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            order = range(0, 30, 10) if self.passes <= 2 else range(20, -1, -10)
            return iter([(x[b : b + 10], y[b : b + 10]) for b in order])

    with pytest.raises(advx.errors.InputError, match="another order"):
        advx.audit(
            trained_mlp,
            Shifty(),
            advx.Linf(EPS),
            suite=[advx.FGSM(advx.Linf(EPS))],
            eps_curve=None,
            checks=False,
            batch_size=10,
        )
    assert not any(t.name == "advx-prefetch" for t in threading.enumerate())
