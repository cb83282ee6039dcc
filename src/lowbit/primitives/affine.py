"""Choose scales, quantize and dequantize: integer (affine/symmetric) and float8 types alike.

Formulas (per block, ``qmin``/``qmax`` from the qtype):

* symmetric:  ``scale = max(|x|) / qmax``, no zero point, ``q = clamp(round(x / scale))``
* asymmetric: ``scale = (max(x, 0) - min(x, 0)) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(min(x, 0) / scale))`` (an integer, so 0.0 is exact),
  ``q = clamp(round(x / scale) + zero_point)``
* float8:     ``scale = max(|x|) / finfo.max``, ``q = clamp(x / scale, -max, max).to(float8)``
* dequantize: ``x = (q - zero_point) * scale``

``round`` is round-half-to-even (``torch.round``) and the zero point is added after rounding.
Scales never fall below the smallest normal of their dtype, so all-zero blocks give exact zeros.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .blocks import block_dims, check_block_size, expand_params, to_blocks
from .qtypes import QType, get_qtype


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError if ``x`` holds NaN or infinity (weights must be finite)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf); expected finite values to quantize")


def choose_qparams(
    x: torch.Tensor,
    block_size: Sequence[int],
    qtype: str | QType,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    ignore_nonfinite: bool = False,
    name: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compute per-block scale and zero point (None when symmetric or float8).

    Args:
        x: float32, bfloat16 or float16 tensor.
        block_size: one block extent per dimension (see :mod:`lowbit.primitives.blocks`).
        qtype: target type name or QType.
        symmetric: symmetric range around 0 (no zero point) or asymmetric min/max range.
        scale_dtype: dtype of the returned scale; its smallest normal is the scale floor.
        ignore_nonfinite: treat NaN/inf as 0 for the statistics (activations) instead of
            raising ValueError naming ``name`` (weights).
        name: tensor name used in error messages.

    Returns:
        ``(scale, zero_point)``, both of shape ``x.shape[i] // block_size[i]``; the zero
        point has the qtype's storage dtype.

    Example:
        >>> scale, zp = choose_qparams(torch.tensor([[-1.0, 0.5]]), (1, 2), "int8")
        >>> round(scale.item() * 127, 6), zp
        (1.0, None)
    """
    qt = get_qtype(qtype)
    block_size = check_block_size(x.shape, block_size)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor; received dtype {x.dtype}")
    if ignore_nonfinite:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        check_finite(x, name)
    xb = to_blocks(x, block_size).float()
    dims = block_dims(x.dim())
    if symmetric or qt.is_float:
        if not symmetric:
            raise ValueError(f"{qt.name} quantization is symmetric; received symmetric=False")
        amax = torch.maximum(xb.amax(dim=dims), -xb.amin(dim=dims))  # no |x| copy of the tensor
        return _round_up(amax / qt.qmax, scale_dtype), None
    min_neg = xb.amin(dim=dims).clamp(max=0)
    max_pos = xb.amax(dim=dims).clamp(min=0)
    scale = _round_up((max_pos - min_neg) / (qt.qmax - qt.qmin), scale_dtype)
    zero_point = (qt.qmin - torch.round(min_neg / scale.float())).clamp(qt.qmin, qt.qmax)
    return scale, zero_point.to(qt.storage)


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float32 scale to ``dtype`` never rounding down (a smaller scale would clip the block's
    extremes), floored at the dtype's smallest normal."""
    cast = scale.to(dtype)
    cast = torch.where(cast.float() < scale, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)
    return cast.clamp(min=torch.finfo(dtype).tiny)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: Sequence[int],
    qtype: str | QType,
    *,
    saturate_nonfinite: bool = False,
) -> torch.Tensor:
    """Quantize ``x`` block-wise to the qtype's storage dtype (int4 stays unpacked here).

    With ``saturate_nonfinite`` (activations), +/-inf saturate to qmax/qmin and NaN maps to
    the zero point; otherwise the caller guarantees finite input.

    Example:
        >>> quantize(torch.tensor([[0.5, 1.5, -2.5]]), torch.ones(1, 1), None, (1, 3), "int8")
        tensor([[ 0,  2, -2]], dtype=torch.int8)
    """
    qt = get_qtype(qtype)
    shape = x.shape
    xb = to_blocks(x, block_size).float()
    scaled = xb / expand_params(scale).float()
    if qt.is_float:
        if saturate_nonfinite:
            scaled = torch.nan_to_num(scaled, nan=0.0)
        return scaled.clamp(qt.qmin, qt.qmax).to(qt.storage).reshape(shape)
    q = scaled.round_()  # in place on the fresh quotient: one full-size temporary, not four
    if saturate_nonfinite:
        q = q.nan_to_num_(nan=0.0)
    if zero_point is not None:
        q = q.add_(expand_params(zero_point).float())
    return q.clamp_(qt.qmin, qt.qmax).to(qt.storage).reshape(shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Map quantized values back to floats: ``(q - zero_point) * scale``.

    Example:
        >>> dequantize(torch.tensor([[0, 2]], dtype=torch.int8), torch.full((1, 1), 0.5), None, (1, 2))
        tensor([[0., 1.]])
    """
    shape = q.shape
    qb = to_blocks(q, block_size).float()
    if zero_point is not None:
        qb = qb - expand_params(zero_point).float()
    return (qb * expand_params(scale).float()).to(out_dtype).reshape(shape)


def quantize_weight(
    w: torch.Tensor,
    block_size: Sequence[int],
    qtype: str | QType,
    *,
    symmetric: bool = True,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """choose_qparams + quantize for a finite weight: returns ``(q, scale, zero_point)``.

    Example:
        >>> q, scale, zp = quantize_weight(torch.randn(4, 8), (1, 8), "int8")
        >>> q.dtype, tuple(scale.shape), zp
        (torch.int8, (4, 1), None)
    """
    scale, zero_point = choose_qparams(w, block_size, qtype, symmetric=symmetric, name=name)
    return quantize(w, scale, zero_point, block_size, qtype), scale, zero_point
