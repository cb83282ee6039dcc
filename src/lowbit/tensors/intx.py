"""Intx weights: 2 to 7 bits per value in groups (per output channel on convolutions), bit-packed, symmetric
(int{b}) or affine (uint{b} + zero point)."""

from __future__ import annotations

from ..primitives.qtypes import QTYPES
from .blockwise import BlockQuantizedTensor
from .schemes import register_scheme

INTX_QTYPES = tuple(q.name for q in QTYPES.values() if not q.is_float and 2 <= q.bits <= 7)  # int2 .. uint7


class IntxTensor(BlockQuantizedTensor):
    """``qdata`` holds each row's values as one little-endian bit stream (value j in bits [j*b, (j+1)*b), uint8
    (N, ceil(K*b/8))), with float32 ``scale`` and, for unsigned qtypes, uint8 ``zero_point`` (N, K/G).

    Example:
        >>> from lowbit.specs import weight_spec
        >>> w = IntxTensor.from_spec(torch.randn(16, 64), weight_spec("intx", "uint3", 32), (1, 32))
        >>> tuple(w.qdata.shape), tuple(w.scale.shape)
        ((16, 24), (16, 2))
    """

    scheme = "intx"


register_scheme(IntxTensor, INTX_QTYPES, conv=True)
