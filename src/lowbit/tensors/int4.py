"""Int4 weights, per-group: two values per byte, symmetric (int4) or asymmetric (uint4 + zero point)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.affine import quantize_weight
from ..primitives.packing import pack_int4
from .blockwise import BlockQuantizedTensor


class Int4Tensor(BlockQuantizedTensor):
    """Packed 4-bit ``qdata`` (K/2 bytes per row), float32 ``scale`` and optional uint8 ``zero_point``.

    Example:
        >>> w = Int4Tensor.from_float(torch.randn(16, 64), block_size=(1, 32), symmetric=False)
        >>> tuple(w.qdata.shape), tuple(w.scale.shape), w.zero_point.dtype
        ((16, 32), (16, 2), torch.uint8)
    """

    scheme = "int4"

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        block_size: Sequence[int],
        *,
        symmetric: bool = False,
        kernel: str = "auto",
        name: str = "weight",
    ):
        qtype = "int4" if symmetric else "uint4"
        q, scale, zero_point = quantize_weight(w, block_size, qtype, symmetric=symmetric, name=name)
        return cls(
            qdata=pack_int4(q, dim=-1), scale=scale, zero_point=zero_point, qtype=qtype,
            block_size=tuple(block_size), packed_dim=w.dim() - 1, kernel=kernel, shape=w.shape, dtype=w.dtype,
        )
