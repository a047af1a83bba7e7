"""Per-sample random streams: keyed by (seed, sample index, key) alone."""

import pytest
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


# ---- the streams are fixed: the hash as first written, kept here as the reference ----------------
_M32 = 0xFFFFFFFF


def _ref_mul32(h, c):
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _ref_mix(h):
    h = h & _M32
    h = h ^ (h >> 16)
    h = _ref_mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _ref_mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def _ref_bits(seed, index, key, shape):
    from advx._rng import _combine, _mix_int

    k = _mix_int(seed & _M32) ^ _mix_int((seed >> 32) + 0x632BE5AB)
    for part in key:
        k = _combine(k, int(part) & _M32)
        k = _combine(k, (int(part) >> 32) & _M32)
    state = _ref_mix(_ref_mix(index & _M32) ^ (index >> 32) ^ k)
    state = _ref_mix(state + 0x2545F491)
    m = 1
    for d in shape:
        m *= d
    j = torch.arange(m, dtype=torch.long)
    h = _ref_mix(state.view(-1, 1) ^ _ref_mix(j * 2 + 1).view(1, -1))
    h = _ref_mix(h + state.view(-1, 1))
    return h.view(len(index), *shape)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**62 + 12345, -3])
def test_bits_equal_the_reference_hash(seed):
    index = torch.cat([torch.arange(50), torch.tensor([2**31 - 1, 2**32 + 3, 2**40 + 17])])
    for key, shape in [((1, 2, 3), (26,)), ((0,), (2, 3, 4)), ((5, 2**33 + 1), ()), ((), (7,))]:
        want = _ref_bits(seed, index, key, shape)
        assert torch.equal(SampleRNG(seed, index)._bits(key, shape), want)
        # selecting rows keeps each row's stream
        part = SampleRNG(seed, index).select(torch.tensor([3, 51, 0]))
        assert torch.equal(part._bits(key, shape), want[[3, 51, 0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_uniform_equals_the_reference(dtype):
    index = torch.arange(40) * 3
    want = ((_ref_bits(9, index, (4, 1), (6,)) >> 8).to(torch.float64) / (1 << 24)).to(dtype)
    assert torch.equal(SampleRNG(9, index).uniform(4, 1, shape=(6,), dtype=dtype), want)


def test_a_block_of_draws_equals_the_draws_one_by_one():
    rng = SampleRNG(11, torch.arange(30) + 1000)
    block = rng.uniform_block(1, 0, last=range(17, 29), shape=(2, 5), dtype=torch.float64)
    assert block.shape == (30, 12, 2, 5)
    for b, t in enumerate(range(17, 29)):
        one = rng.uniform(1, 0, t, shape=(2, 5), dtype=torch.float64)
        assert torch.equal(block[:, b], one)
    sub = rng.select(torch.tensor([4, 2]))
    assert torch.equal(
        sub.uniform_block(1, 0, last=range(17, 29), shape=(2, 5), dtype=torch.float64),
        block[[4, 2]],
    )
