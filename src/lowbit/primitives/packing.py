"""Two 4-bit values per byte: element 2i in the low nibble, 2i+1 in the high nibble."""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack 4-bit values (int8 in [-8, 7] or uint8 in [0, 15]) two per uint8 byte along ``dim``.

    Example:
        >>> pack_int4(torch.tensor([[1, -2]], dtype=torch.int8))
        tensor([[225]], dtype=torch.uint8)
    """
    dim = dim % q.dim()
    if q.shape[dim] % 2:
        raise ValueError(f"int4 packing needs an even size along dim {dim}; received shape {tuple(q.shape)}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement low nibble for signed values
    pairs = nibbles.unflatten(dim, (-1, 2))  # (..., K/2, 2, ...)
    low, high = pairs.unbind(dim + 1)
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor, signed: bool, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 values in [-8, 7] if ``signed`` else uint8 in [0, 15].

    Example:
        >>> unpack_int4(torch.tensor([[225]], dtype=torch.uint8), signed=True)
        tensor([[ 1, -2]], dtype=torch.int8)
    """
    dim = dim % packed.dim()
    low = packed & 0xF
    high = packed >> 4
    q = torch.stack([low, high], dim=dim + 1).flatten(dim, dim + 1)  # (..., K, ...)
    if not signed:
        return q
    q = q.to(torch.int8)
    return torch.where(q >= 8, q - 16, q)
