"""Bit packing: any width of 1..8 bits as a little-endian bit stream along one dim (pack_bits / unpack_bits),
and int4 as its 4-bit case: element 2i in the low nibble, 2i+1 in the high nibble."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.primitives import pack_bits, pack_int4, unpack_bits, unpack_int4


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


def _stream_reference(values: list[int], bits: int) -> list[int]:
    """The packed bytes built bit by bit: value j's bit t is stream bit j * bits + t, stream bit i is bit i % 8 of byte i // 8."""
    out = [0] * -(-len(values) * bits // 8)
    for j, v in enumerate(values):
        for t in range(bits):
            i = j * bits + t
            out[i // 8] |= ((v >> t) & 1) << (i % 8)
    return out


def _random_values(shape, bits: int, signed: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << bits - 1), 1 << bits - 1) if signed else (0, 1 << bits)
    return torch.randint(lo, hi, shape, generator=gen).to(torch.int8 if signed else torch.uint8)


@pytest.mark.parametrize("values,bits,expected", [
    ([1, 2, 3], 3, [0b11010001, 0b0]),  # 1 | 2 << 3 | (3 & 3) << 6, then 3 >> 2 in bit 0 of byte 1
    ([31, 0, 1], 5, [0x1F, 0x04]),  # 1 starts at stream bit 10: bit 2 of byte 1
    ([1, 0, 1, 1, 0, 0, 0, 1, 1], 1, [0b10001101, 0b1]),
    ([0x7F, 0x01], 7, [0xFF, 0x00]),  # bit 7 of byte 0 is bit 0 of the second value
    ([200, 7], 8, [200, 7]),
])
def test_bit_order_golden(values, bits, expected):
    packed = pack_bits(torch.tensor([values], dtype=torch.uint8), bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == [expected]
    assert unpack_bits(packed, bits, len(values), signed=False).tolist() == [values]


def test_signed_values_are_stored_as_twos_complement():
    q = torch.tensor([[-1, -4, 3]], dtype=torch.int8)  # 3-bit codes 7, 4, 3
    assert pack_bits(q, 3).tolist() == [_stream_reference([7, 4, 3], 3)] == [[7 | 4 << 3 | (3 & 3) << 6, 0]]
    assert torch.equal(unpack_bits(pack_bits(q, 3), 3, 3, signed=True), q)


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(1, 8),
    length=st.integers(1, 67),
    rows=st.integers(1, 3),
    along_rows=st.booleans(),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pack_bits_round_trip_and_stream(bits, length, rows, along_rows, signed, seed):
    """Round trip for every width, odd lengths included, along dim 0 and -1; the bytes equal the stream built bit by
    bit, the unused bits of the last byte are zero, and the packed size is ceil(length * bits / 8)."""
    q = _random_values((rows, length), bits, signed, seed)
    dim = 0 if along_rows else -1
    data = q.t().contiguous() if along_rows else q  # the packed run lies along `dim`
    packed = pack_bits(data, bits, dim=dim)
    nbytes = -(-length * bits // 8)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((nbytes, rows) if along_rows else (rows, nbytes))
    runs = packed.t() if along_rows else packed
    for r in range(rows):
        codes = [v & ((1 << bits) - 1) for v in q[r].tolist()]
        assert runs[r].tolist() == _stream_reference(codes, bits)
    out = unpack_bits(packed, bits, length, signed=signed, dim=dim)
    assert out.dtype == q.dtype and torch.equal(out, data)


@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(1, 20), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_bits_at_4_bits_is_pack_int4(pairs, signed, seed):
    q = _random_values((3, 2 * pairs), 4, signed, seed)
    assert torch.equal(pack_bits(q, 4), pack_int4(q))
    assert torch.equal(pack_bits(q.t(), 4, dim=0), pack_int4(q.t(), dim=0))
    assert torch.equal(unpack_bits(pack_int4(q), 4, 2 * pairs, signed), unpack_int4(pack_int4(q), signed))


def test_pack_bits_wider_integer_dtypes():
    """Any integer dtype packs; its signedness says which range it holds."""
    q = torch.tensor([[-4, 3, 0, -1, 2]])  # int64
    assert torch.equal(pack_bits(q, 3), pack_bits(q.to(torch.int8), 3))
    assert torch.equal(pack_bits(torch.tensor([[-1, 0, -3]], dtype=torch.int32), 3),
                       pack_bits(torch.tensor([[7, 0, 5]], dtype=torch.uint8), 3))  # the same two's complement codes


def test_pack_bits_empty():
    assert pack_bits(torch.zeros(2, 0, dtype=torch.uint8), 3).shape == (2, 0)
    assert unpack_bits(torch.zeros(2, 0, dtype=torch.uint8), 3, 0, signed=True).shape == (2, 0)


@pytest.mark.parametrize("bits", [0, 9, -1, True, 3.0, "3"])
def test_bits_outside_1_to_8_raise(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8; received"):
        pack_bits(torch.zeros(1, 4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8; received"):
        unpack_bits(torch.zeros(1, 4, dtype=torch.uint8), bits, 4, signed=False)


@pytest.mark.parametrize("values,dtype,bits,message", [
    ([0, 8], torch.uint8, 3, r"3-bit unsigned values must lie in \[0, 7\]; received values in \[0, 8\]"),
    ([-5, 3], torch.int8, 3, r"3-bit signed values must lie in \[-4, 3\]; received values in \[-5, 3\]"),
    ([0, 4], torch.int64, 3, r"3-bit signed values must lie in \[-4, 3\]; received values in \[0, 4\]"),
    ([2], torch.uint8, 1, r"1-bit unsigned values must lie in \[0, 1\]; received values in \[2, 2\]"),
])
def test_out_of_range_values_raise(values, dtype, bits, message):
    with pytest.raises(ValueError, match=message):
        pack_bits(torch.tensor([values], dtype=dtype), bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_input_raises(dtype):
    with pytest.raises(ValueError, match="pack_bits takes an integer tensor; received"):
        pack_bits(torch.zeros(1, 4, dtype=dtype), 3)


def test_unpack_checks_the_byte_count_and_dtype():
    with pytest.raises(ValueError, match=r"expected uint8 with 2 bytes along dim 1 for 5 3-bit values; received torch.uint8 of shape \(1, 3\)"):
        unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 3, 5, signed=False)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.int8), 3, 5, signed=False)
