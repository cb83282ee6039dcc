"""Sub-byte values packed along one dim as a little-endian bit stream.

Value j of a packed run occupies stream bits [j*bits, (j+1)*bits); stream bit i is bit (i % 8) of byte i // 8.
For 4 bits this is element 2i in the low nibble, 2i+1 in the high nibble. Signed values are stored as their
``bits``-bit two's complement; a run whose bit count is not a multiple of 8 ends in zero bits.

Both directions work on 8 values at a time, which fill exactly ``bits`` bytes: one int64 word per 8 values,
built and split by a loop over the 8 value positions and the ``bits`` byte positions, so temporaries stay
near one byte per value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8; received {bits!r}")


def pack_bits(q: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer values of ``bits`` bits along ``dim`` into uint8, ceil(n * bits / 8) bytes.

    A signed dtype holds values in [-2^(bits-1), 2^(bits-1) - 1] (stored as two's complement), an unsigned one
    values in [0, 2^bits - 1].

    Example:
        >>> pack_bits(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 3)
        tensor([[209, 0]], dtype=torch.uint8)
    """
    _check_bits(bits)
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"pack_bits takes an integer tensor; received {q.dtype}")
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if q.dtype.is_signed else (0, (1 << bits) - 1)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"{bits}-bit {'signed' if q.dtype.is_signed else 'unsigned'} values must lie in [{lo}, {hi}]; "
                         f"received values in [{int(q.min())}, {int(q.max())}]")
    dim = dim % q.dim()
    n = q.shape[dim]
    codes = (q.movedim(dim, -1) & ((1 << bits) - 1)).to(torch.uint8)  # (..., n) two's complement codes
    codes = F.pad(codes, (0, -n % 8)).unflatten(-1, (-1, 8))  # (..., n/8, 8): 8 values fill `bits` bytes
    words = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=q.device)  # (..., n/8): 8 * bits stream bits
    for j in range(8):
        words |= codes[..., j].to(torch.int64) << (bits * j)
    packed = torch.stack([((words >> (8 * i)) & 0xFF).to(torch.uint8) for i in range(bits)], -1)  # (..., n/8, bits)
    return packed.flatten(-2)[..., : -(-n * bits // 8)].movedim(-1, dim)


def unpack_bits(packed: torch.Tensor, bits: int, length: int, signed: bool, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``length`` values along ``dim``, int8 if ``signed`` else uint8.

    Example:
        >>> unpack_bits(torch.tensor([[209, 0]], dtype=torch.uint8), 3, 3, signed=False)
        tensor([[1, 2, 3]], dtype=torch.uint8)
    """
    _check_bits(bits)
    dim = dim % packed.dim()
    if packed.dtype != torch.uint8 or packed.shape[dim] != -(-length * bits // 8):
        raise ValueError(f"expected uint8 with {-(-length * bits // 8)} bytes along dim {dim} for {length} {bits}-bit "
                         f"values; received {packed.dtype} of shape {tuple(packed.shape)}")
    data = packed.movedim(dim, -1)
    data = F.pad(data, (0, -data.shape[-1] % bits)).unflatten(-1, (-1, bits))  # (..., n/8, bits): 8 values each
    words = torch.zeros(data.shape[:-1], dtype=torch.int64, device=packed.device)  # (..., n/8)
    for i in range(bits):
        words |= data[..., i].to(torch.int64) << (8 * i)
    mask = (1 << bits) - 1
    values = torch.stack([((words >> (bits * j)) & mask).to(torch.uint8) for j in range(8)], -1)  # (..., n/8, 8)
    values = values.flatten(-2)[..., :length]
    if signed:
        half = 1 << (bits - 1)
        values = ((values.to(torch.int16) ^ half) - half).to(torch.int8)  # two's complement
    return values.movedim(-1, dim)


def pack_int4(q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack 4-bit values (int8 in [-8, 7] or uint8 in [0, 15]) two per uint8 byte along ``dim``.

    Example:
        >>> pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
        tensor([[225]], dtype=torch.uint8)
    """
    dim = dim % q.dim()
    if q.shape[dim] % 2:
        raise ValueError(f"int4 packing needs an even size along dim {dim}; received shape {tuple(q.shape)}")
    return pack_bits(q, 4, dim)


def unpack_int4(packed: torch.Tensor, signed: bool, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 values in [-8, 7] if ``signed`` else uint8 in [0, 15].

    Example:
        >>> unpack_int4(torch.tensor([[225]], dtype=torch.uint8), signed=True)
        tensor([[ 1, -2]], dtype=torch.int8)
    """
    return unpack_bits(packed, 4, packed.shape[dim] * 2, signed, dim)
