"""Quantize-dequantize (fake quantization) and dequantization of stored weights, on plain tensors.

These are the numerics every flow shares: the reference kernels apply them at run time, QAT trains through
their straight-through version (:func:`fake_quantize_ste`, the same values), and the export flow uses them,
so every flow's results agree with the kernels' by construction.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .affine import choose_qparams, dequantize, quantize
from .blocks import expand_params, per_token_block, to_blocks
from .packing import unpack_bits
from .qtypes import get_qtype


def fake_quantize(x: torch.Tensor, block_size: Sequence[int], qtype: str, *, symmetric: bool = True,
                  scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` block-wise, in ``x``'s dtype: with the given ``scale`` (and
    ``zero_point``), or with qparams chosen from ``x`` (non-finite values ignored for the statistics). +-inf
    saturate at the range's ends; NaN maps to the zero point.

    Example:
        >>> fake_quantize(torch.tensor([[0.26, -1.0]]), (1, 2), "int8").mul(127).round().tolist()
        [[33.0, -127.0]]
    """
    if scale is None:
        scale, zero_point = choose_qparams(x, block_size, qtype, symmetric=symmetric, ignore_nonfinite=True)
    q = quantize(x, scale, zero_point, block_size, qtype, saturate_nonfinite=True)
    return dequantize(q, scale, zero_point, block_size, x.dtype)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (half to even) forward, identity gradient (the straight-through estimator).
    ``x + (round(x) - x)`` is exactly ``round(x)`` in floating point: the difference is exact (Sterbenz)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, block_size: Sequence[int],
                      qtype: str) -> torch.Tensor:
    """:func:`fake_quantize` with given qparams, differentiable: bit-identical forward values, rounding with a
    straight-through gradient, clipping with its natural one (zero outside the range), and the gradients of
    ``scale`` and a float ``zero_point`` (integer-valued; LSQ learns both) through the same expression.

    Example:
        >>> x = torch.tensor([[0.26, -1.0]], requires_grad=True)
        >>> y = fake_quantize_ste(x, torch.full((1, 1), 1 / 127), None, (1, 2), "int8")
        >>> y.sum().backward(); x.grad.tolist()
        [[1.0, 1.0]]
    """
    qt = get_qtype(qtype)
    shape = x.shape
    scale = expand_params(scale).float()
    scaled = to_blocks(x, block_size).float() / scale
    if qt.is_float:  # float8: rounding to the nearest representable value, straight through where it stays in range
        rounded = scaled.detach().clamp(qt.qmin, qt.qmax).to(qt.storage).float()
        inside = scaled.abs() < _largest_rounding_to_max(qt.storage)  # as integers: round, then clip
        q = rounded + (scaled - scaled.detach()) * inside
        return (q * scale).to(x.dtype).reshape(shape)
    q = ste_round(scaled)
    if zero_point is None:
        return (q.clamp(qt.qmin, qt.qmax) * scale).to(x.dtype).reshape(shape)
    zero_point = expand_params(zero_point).float()
    return ((q + zero_point).clamp(qt.qmin, qt.qmax).sub(zero_point) * scale).to(x.dtype).reshape(shape)


def _largest_rounding_to_max(dtype: torch.dtype) -> float:
    """Where rounding to the float ``dtype`` stops giving its largest finite value: max + half its last step."""
    info = torch.finfo(dtype)
    return info.max + 2.0 ** (math.frexp(info.max)[1] - 1) * info.eps / 2


def fake_quantize_activation(x: torch.Tensor, act) -> torch.Tensor:
    """Quantize-dequantize ``x`` as the run-time activation quantization ``act`` (an ActivationQuant) does:
    per token (a scale per row of the last dim) or per tensor."""
    block = per_token_block(x.shape) if act.granularity == "per_token" else tuple(x.shape)
    return fake_quantize(x, block, act.qtype, symmetric=act.symmetric)


def fake_quantize_static(x: torch.Tensor, act, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with a calibrated per-tensor scale (and zero point)."""
    ones = (1,) * x.dim()
    zero_point = None if zero_point is None else zero_point.reshape(ones)
    return fake_quantize(x, tuple(x.shape), act.qtype, scale=scale.reshape(ones), zero_point=zero_point)


def unpacked_values(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> torch.Tensor:
    """A stored weight's quantized values, unpacked from their bit stream along ``packed_dim`` for sub-byte qtypes."""
    qt, q = get_qtype(meta["qtype"]), tensors["qdata"]
    if not qt.packed:
        return q
    dim = meta["packed_dim"]
    return unpack_bits(q, qt.bits, meta["shape"][dim], signed=qt.qmin < 0, dim=dim)


def dequantize_weight(tensors: Mapping[str, torch.Tensor], meta: Mapping, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a block-quantized weight given as plain inner tensors and metadata."""
    return dequantize(unpacked_values(tensors, meta), tensors["scale"], tensors.get("zero_point"), meta["block_size"], dtype)
