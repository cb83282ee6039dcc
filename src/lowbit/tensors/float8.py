"""Float8 weights (e4m3fn or e5m2), per-tensor or per-row scale, saturating cast."""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.qtypes import float8_qtype
from ..specs import weight_spec
from .blockwise import BlockQuantizedTensor
from .schemes import register_scheme


class Float8Tensor(BlockQuantizedTensor):
    """float8 ``qdata`` with a float32 ``scale`` per block (per-row: block (1, K); per-tensor: (N, K)).

    Example:
        >>> w = Float8Tensor.from_float(torch.randn(16, 32), block_size=(1, 32))
        >>> w.qdata.dtype
        torch.float8_e4m3fn
    """

    scheme = "float8"

    @classmethod
    def from_float(cls, w: torch.Tensor, block_size: Sequence[int], *, float8_dtype: torch.dtype = torch.float8_e4m3fn,
                   kernel: str = "auto", name: str = "weight", groups: int | None = None):
        spec = weight_spec("float8", float8_qtype(float8_dtype).name)
        return cls.from_spec(w, spec, block_size, kernel=kernel, name=name, groups=groups)


register_scheme(Float8Tensor, ("float8_e4m3fn", "float8_e5m2"), dynamic="float8_dynamic", static="float8_static", conv=True)
