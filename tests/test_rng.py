"""Per-sample random streams: keyed by (seed, sample index, key) alone."""

import torch

from advx._rng import SampleRNG


def test_a_sample_stream_does_not_depend_on_its_batch():
    full = SampleRNG(7, torch.arange(100)).uniform(1, 2, shape=(50,))
    part = SampleRNG(7, torch.arange(40, 60)).uniform(1, 2, shape=(50,))
    assert torch.equal(full[40:60], part)


def test_keys_and_seeds_change_the_stream():
    a = SampleRNG(0, torch.arange(10)).uniform(1, shape=(20,))
    assert not torch.equal(a, SampleRNG(1, torch.arange(10)).uniform(1, shape=(20,)))
    assert not torch.equal(a, SampleRNG(0, torch.arange(10)).uniform(2, shape=(20,)))


def test_distributions_look_right():
    r = SampleRNG(3, torch.arange(200))
    u = r.uniform(0, shape=(1000,))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - (1 / 12) ** 0.5) < 0.005
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float((counts / counts.mean() - 1).abs().max()) < 0.03
    z = r.normal(1, shape=(1000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    k = r.randint(2, high=7, shape=(1000,))
    assert int(k.min()) == 0 and int(k.max()) == 6
    neighbours = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]
    assert abs(float(neighbours)) < 0.01
