"""int4 packing: two 4-bit values per byte, element 2i in the low nibble, 2i+1 in the high nibble."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.primitives import pack_int4, unpack_int4


def test_docstring_examples():
    packed = pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[225]]
    out = unpack_int4(torch.tensor([[225]], dtype=torch.uint8), signed=True)
    assert out.dtype == torch.int8 and out.tolist() == [[1, -2]]


def test_nibble_order_last_dim():
    q = torch.tensor([[1, 2, 15, 0, 3, 10]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (1, 3)
    # element 2i -> low nibble, element 2i+1 -> high nibble
    assert packed.tolist() == [[0x21, 0x0F, 0xA3]]
    assert unpack_int4(packed, signed=False).tolist() == q.tolist()


def test_nibble_order_dim0():
    q = torch.tensor([[1, 5], [2, 6], [-8, 7], [-1, 0]], dtype=torch.int8)
    packed = pack_int4(q, dim=0)
    assert packed.shape == (2, 2) and packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x65], [0xF8, 0x07]]
    assert torch.equal(unpack_int4(packed, signed=True, dim=0), q)


def test_signed_twos_complement_nibbles():
    q = torch.arange(-8, 8, dtype=torch.int8)  # 16 values
    packed = pack_int4(q)
    lows = (packed & 0xF).tolist()
    highs = (packed >> 4).tolist()
    assert lows == [v & 0xF for v in range(-8, 8, 2)]
    assert highs == [v & 0xF for v in range(-7, 8, 2)]
    assert torch.equal(unpack_int4(packed, signed=True), q)
    # The same bytes read unsigned give the two's complement codes.
    assert unpack_int4(packed, signed=False).tolist() == [v & 0xF for v in range(-8, 8)]


def test_unpack_all_bytes_roundtrip():
    allbytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    for signed in (True, False):
        q = unpack_int4(allbytes, signed=signed)
        assert q.shape == (16, 32)
        assert q.dtype == (torch.int8 if signed else torch.uint8)
        if signed:
            assert int(q.min()) == -8 and int(q.max()) == 7
        else:
            assert int(q.min()) == 0 and int(q.max()) == 15
        assert torch.equal(pack_int4(q), allbytes)
        assert torch.equal(pack_int4(unpack_int4(allbytes, signed=signed, dim=0), dim=0), allbytes)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dim=st.integers(-3, 2),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_random(shape, dim, signed, seed):
    ndim = len(shape)
    if not -ndim <= dim < ndim:
        dim = dim % ndim
    shape[dim] *= 2  # make the packed dim even
    gen = torch.Generator().manual_seed(seed)
    if signed:
        q = torch.randint(-8, 8, shape, generator=gen).to(torch.int8)
    else:
        q = torch.randint(0, 16, shape, generator=gen).to(torch.uint8)
    packed = pack_int4(q, dim=dim)
    expected = list(shape)
    expected[dim] //= 2
    assert list(packed.shape) == expected and packed.dtype == torch.uint8
    out = unpack_int4(packed, signed=signed, dim=dim)
    assert out.dtype == q.dtype
    assert torch.equal(out, q)


def test_pack_three_dim_middle():
    q = torch.randint(-8, 8, (2, 4, 3)).to(torch.int8)
    packed = pack_int4(q, dim=1)
    assert packed.shape == (2, 2, 3)
    # Element (b, 2i, c) is the low nibble of packed (b, i, c).
    assert torch.equal((packed & 0xF), (q[:, 0::2, :].to(torch.int16) & 0xF).to(torch.uint8))
    assert torch.equal((packed >> 4), (q[:, 1::2, :].to(torch.int16) & 0xF).to(torch.uint8))
    assert torch.equal(unpack_int4(packed, signed=True, dim=1), q)


@pytest.mark.parametrize("shape,dim", [((3, 5), -1), ((3, 4), 0), ((1,), 0), ((2, 3, 4), 1)])
def test_odd_size_raises(shape, dim):
    q = torch.zeros(shape, dtype=torch.int8)
    with pytest.raises(ValueError, match="even"):
        pack_int4(q, dim=dim)
