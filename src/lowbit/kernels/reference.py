"""Reference kernels: dequantize, then use PyTorch's float ops. Correct everywhere, not fast.

Dynamic and static activation kernels fake-quantize the activation (quantize then dequantize), so
results match the integer math up to float rounding. Like every kernel they compute values only:
gradients come from :mod:`lowbit.kernels.boundary`.

Non-finite activations of linears follow one rule in every kernel: a NaN anywhere in an input row
makes every output of that row NaN; +-inf saturate at the row's range (weight-only: the largest
finite magnitude of the row; quantized activations: the quantization range's ends).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..primitives.fake_quantize import dequantize_weight, fake_quantize_activation, fake_quantize_static
from .registry import unpacked


def saturate_inf(x: torch.Tensor) -> torch.Tensor:
    """x with every +-inf replaced by +-(the largest finite magnitude of its row, the last dim); NaN kept."""
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(torch.isinf(x), torch.copysign(finite.abs().amax(-1, keepdim=True), x), x)


def nan_rows(x: torch.Tensor) -> torch.Tensor:
    """(*, 1) bool: which rows (along the last dim) of x hold a NaN."""
    return torch.isnan(x).any(-1, keepdim=True)


def mark_nan_rows(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` with every row whose input row in ``x`` holds a NaN set to NaN."""
    return out.masked_fill(nan_rows(x), float("nan"))


def weight_values(tensors: dict, meta: dict, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight, also of a weight whose kernel keeps only its own layout."""
    return dequantize_weight(unpacked(tensors, meta), meta, dtype)


def _float_linear(x, tensors, meta, bias):
    return F.linear(x, weight_values(tensors, meta, x.dtype), bias)


def _linear(x, tensors, meta, bias):
    """Weight-only: float activations, inf saturated; a NaN reaches its whole row through the products."""
    return _float_linear(saturate_inf(x), tensors, meta, bias)


def _dynamic_linear(x, tensors, meta, bias):
    return mark_nan_rows(_float_linear(fake_quantize_activation(x, meta["activation"]), tensors, meta, bias), x)


def _static_linear(x, tensors, meta, bias):
    if "act_smooth" in tensors:
        x = x / tensors["act_smooth"].to(x.dtype)
    xq = fake_quantize_static(x, meta["activation"], tensors["act_scale"], tensors.get("act_zero_point"))
    return mark_nan_rows(_float_linear(xq, tensors, meta, bias), x)


def _bmm(x, tensors, meta, bias):
    return torch.bmm(x, weight_values(tensors, meta, x.dtype))


def _embedding(indices, tensors, meta, bias):
    """Gather the quantized rows first, then dequantize only those rows."""
    block_rows = meta["block_size"][0]
    names = [n for n in ("qdata", "scale", "zero_point") if n in tensors]
    rows = {n: tensors[n][indices if n == "qdata" else indices // block_rows] for n in names}  # (*I, ...)
    block = (1,) * indices.dim() + tuple(meta["block_size"][1:])
    packed_dim = meta["packed_dim"]
    row_meta = dict(meta, shape=(*indices.shape, meta["shape"][-1]), block_size=block,
                    packed_dim=None if packed_dim is None else indices.dim())
    return dequantize_weight(rows, row_meta, meta["dtype"])


def _conv(x, tensors, meta, bias):
    func, args, kwargs = meta["conv"]
    return func(x, weight_values(tensors, meta, x.dtype), bias, *args, **kwargs)


def _static_conv(x, tensors, meta, bias):
    xq = fake_quantize_static(x, meta["activation"], tensors["act_scale"], tensors.get("act_zero_point"))
    return _conv(xq, tensors, meta, bias)


# The reference kernel of each op, by activation mode; lowbit.tensors.schemes registers them for every scheme.
WEIGHT_ONLY = {"linear": _linear, "bmm": _bmm, "embedding": _embedding, "conv": _conv}
DYNAMIC = {"linear": _dynamic_linear}
STATIC = {"linear": _static_linear, "conv": _static_conv}
