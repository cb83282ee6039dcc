"""Float8 weights (e4m3fn or e5m2), per-tensor or per-row scale, saturating cast."""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.affine import quantize_weight
from ..primitives.qtypes import float8_qtype
from .blockwise import BlockQuantizedTensor


class Float8Tensor(BlockQuantizedTensor):
    """float8 ``qdata`` with a float32 ``scale`` per block (per-row: block (1, K); per-tensor: (N, K)).

    Example:
        >>> w = Float8Tensor.from_float(torch.randn(16, 32), block_size=(1, 32))
        >>> w.qdata.dtype
        torch.float8_e4m3fn
    """

    scheme = "float8"

    @classmethod
    def from_float(
        cls,
        w: torch.Tensor,
        block_size: Sequence[int],
        *,
        float8_dtype: torch.dtype = torch.float8_e4m3fn,
        kernel: str = "auto",
        name: str = "weight",
        groups: int | None = None,
    ):
        qtype = float8_qtype(float8_dtype).name
        q, scale, _ = quantize_weight(w, block_size, qtype, symmetric=True, name=name)
        return cls(
            qdata=q, scale=scale, qtype=qtype, block_size=tuple(block_size), packed_dim=None,
            kernel=kernel, groups=groups, shape=w.shape, dtype=w.dtype,
        )
