"""Int4 weights, per-group: two values per byte, symmetric (int4) or asymmetric (uint4 + zero point)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..specs import weight_spec
from .blockwise import BlockQuantizedTensor
from .schemes import register_scheme


class Int4Tensor(BlockQuantizedTensor):
    """Packed 4-bit ``qdata`` (K/2 bytes per row), float32 ``scale`` and optional uint8 ``zero_point``.

    Example:
        >>> w = Int4Tensor.from_float(torch.randn(16, 64), block_size=(1, 32), symmetric=False)
        >>> tuple(w.qdata.shape), tuple(w.scale.shape), w.zero_point.dtype
        ((16, 32), (16, 2), torch.uint8)
    """

    scheme = "int4"

    @classmethod
    def from_float(cls, w: torch.Tensor, block_size: Sequence[int], *, symmetric: bool = False, kernel: str = "auto",
                   name: str = "weight"):
        spec = weight_spec("int4", "int4" if symmetric else "uint4", block_size[-1])
        return cls.from_spec(w, spec, block_size, kernel=kernel, name=name)


register_scheme(Int4Tensor, ("int4", "uint4"))
