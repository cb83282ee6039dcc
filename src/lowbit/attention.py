"""Quantized attention inputs: ``F.scaled_dot_product_attention`` on int8 / float8 query, key and value.

:func:`quantize_activation` turns an activation into a block-quantized tensor (per token: one scale
per row of the last dim, i.e. per head and position for a (B, H, T, D) tensor; or per tensor with a
calibrated scale). Passing such tensors to ``F.scaled_dot_product_attention`` (an op of the block-quantized tensors' own table)
dequantizes them to the float dtype they stand for (bf16 stays bf16) and runs PyTorch's fused attention kernel: there is
no integer attention kernel in PyTorch to call instead. :class:`QuantizedSDPA` is the module form,
with scales either dynamic or calibrated by ``lowbit.calibrate`` and frozen by ``lowbit.convert``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .calibration.observers import OBSERVERS, NotCalibratedError
from .primitives.affine import choose_qparams, quantize
from .primitives.qtypes import get_qtype
from .tensors import Float8Tensor, Int8Tensor, QuantizedTensor
from .tensors.blockwise import BlockQuantizedTensor

QTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")
GRANULARITIES = ("per_token", "per_tensor")


def quantize_activation(x: torch.Tensor, qtype: str = "int8", granularity: str = "per_token", *, symmetric: bool = True,
                        scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> BlockQuantizedTensor:
    """Quantize an activation (non-finite values saturate) into an Int8Tensor or Float8Tensor.

    Args:
        x: a float tensor, e.g. attention states (B, H, T, D).
        qtype: ``"int8"``, ``"float8_e4m3fn"`` or ``"float8_e5m2"``.
        granularity: ``"per_token"`` (a scale per row of the last dim) or ``"per_tensor"``.
        symmetric: int8 only; False adds an integer zero point.
        scale: a calibrated per-tensor scale (0-d); None computes scales from ``x``.
        zero_point: the calibrated zero point that goes with ``scale`` (asymmetric int8).

    Example:
        >>> q = quantize_activation(torch.randn(1, 2, 4, 8))
        >>> q.qdata.dtype, tuple(q.scale.shape)
        (torch.int8, (1, 2, 4, 1))
    """
    if qtype not in QTYPES:
        raise ValueError(f"activation qtype must be one of {QTYPES}; received {qtype!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; received {granularity!r}")
    if not x.dtype.is_floating_point or isinstance(x, QuantizedTensor):
        raise TypeError(f"quantize_activation takes a plain float tensor; received {type(x).__name__} of {x.dtype}")
    block = (1,) * (x.dim() - 1) + (x.shape[-1],) if granularity == "per_token" else tuple(x.shape)
    is_float8 = get_qtype(qtype).is_float
    if scale is None:
        scale, zero_point = choose_qparams(x.detach(), block, qtype, symmetric=symmetric or is_float8, ignore_nonfinite=True)
    else:
        if granularity != "per_tensor":
            raise ValueError(f"a calibrated scale is per tensor; received granularity={granularity!r}")
        scale = scale.float().reshape((1,) * x.dim())
        zero_point = None if zero_point is None else zero_point.reshape((1,) * x.dim())
    q = quantize(x.detach(), scale, zero_point, block, qtype, saturate_nonfinite=True)
    cls = Float8Tensor if is_float8 else Int8Tensor
    return cls(qdata=q, scale=scale, zero_point=zero_point, qtype=qtype, block_size=block, packed_dim=None,
               kernel="auto", shape=x.shape, dtype=x.dtype)


class QuantizedSDPA(nn.Module):
    """``F.scaled_dot_product_attention`` with query, key and value quantized first.

    Dynamic (default): per-token scales computed on every call. Static (``observer="minmax"`` or another
    observer name): calling the module before ``lowbit.convert`` runs float attention and records each
    input's range; ``lowbit.convert(model)`` freezes one scale per input and later calls quantize with it.

    Example:
        >>> attend = QuantizedSDPA("int8")
        >>> q = k = v = torch.randn(1, 2, 4, 8)
        >>> tuple(attend(q, k, v, is_causal=True).shape)
        (1, 2, 4, 8)
    """

    def __init__(self, qtype: str = "int8", observer: str | None = None, symmetric: bool = True):
        super().__init__()
        if qtype not in QTYPES:
            raise ValueError(f"QuantizedSDPA qtype must be one of {QTYPES}; received {qtype!r}")
        if observer is not None and observer not in OBSERVERS:
            raise ValueError(f"observer must be None (dynamic) or one of {sorted(OBSERVERS)}; received {observer!r}")
        self.qtype, self.symmetric = qtype, symmetric or get_qtype(qtype).is_float
        self.observers = None if observer is None else nn.ModuleList(
            OBSERVERS[observer](qtype, self.symmetric) for _ in range(3))
        # frozen per-tensor scales and zero points of (query, key, value); NaN until convert
        self.register_buffer("scale", torch.full((3,), float("nan")))
        self.register_buffer("zero_point", torch.zeros(3, dtype=torch.int32))

    @property
    def frozen(self) -> bool:
        return not bool(self.scale.isnan().any())

    @property
    def calibrating(self) -> bool:
        return self.observers is not None and not self.frozen

    def freeze(self) -> None:
        """Turn the observed ranges into per-tensor scales (``lowbit.convert`` calls this)."""
        blind = [name for name, obs in zip("qkv", self.observers) if not obs.observed]
        if blind:
            raise NotCalibratedError(f"QuantizedSDPA saw no {blind} inputs: run lowbit.calibrate(model, data) first")
        for i, observer in enumerate(self.observers):
            scale, zero_point = observer.calculate_qparams()
            self.scale[i] = scale
            self.zero_point[i] = 0 if zero_point is None else int(zero_point)

    def forward(self, query, key, value, **kwargs):
        inputs = (query, key, value)
        if self.calibrating:
            for observer, x in zip(self.observers, inputs):
                observer(x)
            return F.scaled_dot_product_attention(query, key, value, **kwargs)
        if not self.frozen:
            quantized = [quantize_activation(x, self.qtype, symmetric=self.symmetric) for x in inputs]
        else:
            zero_points = [None if self.symmetric else z.to(torch.int8) for z in self.zero_point]
            quantized = [quantize_activation(x, self.qtype, "per_tensor", symmetric=self.symmetric, scale=s, zero_point=z)
                         for x, s, z in zip(inputs, self.scale, zero_points)]
        return F.scaled_dot_product_attention(*quantized, **kwargs)

    def extra_repr(self) -> str:
        mode = "static" if self.frozen else "dynamic" if self.observers is None else "calibrating"
        return f"qtype={self.qtype!r}, {mode}"
