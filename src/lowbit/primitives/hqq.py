"""HQQ (Badri & Shaji 2023): calibration-free qparams fit by a half-quadratic solver.

Per block, HQQ minimizes ``sum |W - s (Q - z)|^p`` (``p < 1``, which tolerates a few large errors to fit the
bulk of the block) by alternating, for ``iterations`` steps (stopping early once no block improves):

1. ``Q = clamp(round(W / s + z))``, the values on the current grid;
2. ``E = shrink_p(W - s (Q - z), beta)``, the generalized soft threshold
   ``sign(e) * relu(|e| - |e|^(p-1) / beta)`` (the proximal step of the lp-norm), ``beta *= kappa``;
3. the closed-form least-squares fit of ``W - E`` against ``Q`` per block: the zero point, and the scale too
   (a symmetric qtype fits its scale only).

The solver works in units of each block's min/max (RTN) scale, so it does not depend on the weight's magnitude.
lowbit's zero points are integers (0.0 stays exact), so the float zero point is then rounded and clamped to the
qtype's range: for each of the two integers next to it, the scale is refit (``Q = clamp(round(W / s + z))`` and
``s = <W, Q - z> / |Q - z|^2`` alternate, each step lowering the squared error). Finally each block keeps whichever
of these two and the RTN qparams reconstructs it with the smallest squared error
``sum (W - dequantize(quantize(W)))^2`` (the error a layer's output sees for uncorrelated inputs), so HQQ is never
worse than RTN on any block.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .affine import choose_qparams, dequantize, quantize
from .blocks import block_dims, check_block_size, expand_params, to_blocks
from .qtypes import QType, get_qtype

SCALE_FLOOR = torch.finfo(torch.float32).tiny


def hqq_qparams(
    w: torch.Tensor,
    block_size: Sequence[int],
    qtype: str | QType,
    *,
    symmetric: bool,
    iterations: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    refits: int = 4,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block (scale, zero point) of ``w`` fit by HQQ, in :func:`~lowbit.primitives.affine.choose_qparams`'s
    layout and dtypes: float32 scale floored at its smallest normal, integer zero point in the qtype's range in its
    storage dtype (None when symmetric).

    Args:
        w: finite float weight (raises ValueError naming ``name`` otherwise).
        block_size: one block extent per dimension.
        qtype: an integer qtype.
        symmetric: no zero point (signed qtypes): only the scale is fit.
        iterations: half-quadratic steps at most (the solver stops once no block's lp error decreases).
        p: the error norm's exponent, ``0 < p <= 1``.
        beta, kappa: the shrinkage's initial penalty (in units of the RTN scale) and its growth per step.
        refits: quantize / least-squares-scale alternations after the zero point is rounded.
        name: tensor name used in error messages.

    Example:
        >>> w = torch.randn(8, 64)
        >>> scale, zero = hqq_qparams(w, (1, 32), "uint4", symmetric=False)
        >>> tuple(scale.shape), zero.dtype
        ((8, 2), torch.uint8)
    """
    qt = get_qtype(qtype)
    if qt.is_float:
        raise ValueError(f"hqq fits integer grids; received the float qtype {qt.name}")
    if not 0 < p <= 1 or iterations < 0 or refits < 0:
        raise ValueError(f"hqq needs 0 < p <= 1 and iterations, refits >= 0; received p={p}, iterations={iterations}, "
                         f"refits={refits}")
    block_size = check_block_size(w.shape, block_size)
    rtn_scale, rtn_zero = choose_qparams(w, block_size, qt, symmetric=symmetric, name=name)  # checks finiteness
    dims = block_dims(w.dim())
    x = to_blocks(w, block_size).float() / expand_params(rtn_scale)  # the weight in units of its RTN step
    start = None if symmetric else expand_params(rtn_zero).float()
    ones = torch.ones_like(expand_params(rtn_scale))  # the solver's scale, in units of the RTN scale
    solved, float_zero = _half_quadratic(x, ones, start, qt, dims, iterations, p, beta, kappa)
    best = (rtn_scale, rtn_zero, _squared_error(w, rtn_scale, rtn_zero, block_size, qt))
    integer_zeros = [None] if symmetric else [float_zero.floor(), float_zero.ceil()]
    for zero in integer_zeros:  # each neighbour of HQQ's float zero point, the scale refit for it
        zero = None if zero is None else zero.clamp(qt.qmin, qt.qmax)
        ratio = solved
        for _ in range(refits):
            ratio = _fit_ratio(x, _grid(x, ratio, zero, qt), ratio, zero, dims)
        scale = (rtn_scale * ratio.reshape(rtn_scale.shape)).clamp(min=SCALE_FLOOR)
        zero = None if zero is None else zero.reshape(rtn_scale.shape).to(qt.storage)
        error = _squared_error(w, scale, zero, block_size, qt)
        better = error < best[2]
        best = tuple(None if old is None else torch.where(better, new, old) for new, old in zip((scale, zero, error), best))
    return best[0], best[1]


def _half_quadratic(x, ratio, zero, qt: QType, dims, iterations: int, p: float, beta: float, kappa: float):
    """The float (ratio, zero) of least lp error reached per block, from the given ones."""
    best_ratio, best_zero = ratio, zero
    best_error = _lp_error(x, _grid(x, ratio, zero, qt), ratio, zero, p, dims)
    for _ in range(iterations):
        q = _grid(x, ratio, zero, qt)
        error = x - _reconstruct(q, ratio, zero)
        shrunk = torch.sign(error) * torch.relu(error.abs() - error.abs().pow(p - 1) / beta)
        ratio, zero = _least_squares(x - shrunk, q, ratio, zero, dims)
        beta *= kappa
        error = _lp_error(x, _grid(x, ratio, zero, qt), ratio, zero, p, dims)
        better = error < best_error
        if not bool(better.any()):
            break
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, ratio, best_ratio)
        best_zero = None if zero is None else torch.where(better, zero, best_zero)
    return best_ratio, best_zero


def _grid(x, ratio, zero, qt: QType) -> torch.Tensor:
    q = x / ratio if zero is None else x / ratio + zero  # a float zero point during the solve: rounded with the values
    return q.round_().clamp_(qt.qmin, qt.qmax)


def _reconstruct(q, ratio, zero) -> torch.Tensor:
    return ratio * (q if zero is None else q - zero)


def _lp_error(x, q, ratio, zero, p: float, dims) -> torch.Tensor:
    return (x - _reconstruct(q, ratio, zero)).abs_().pow_(p).sum(dims, keepdim=True)


def _least_squares(target, q, ratio, zero, dims):
    """Per block, ``target ~ ratio * (q - zero)`` by least squares: ratio and zero (a line through the points
    (q, target)), or ratio alone when symmetric; blocks whose fit is undefined or not positive keep theirs."""
    if zero is None:
        return _fit_ratio(target, q, ratio, None, dims), None
    q_mean, t_mean = q.mean(dims, keepdim=True), target.mean(dims, keepdim=True)
    qc = q - q_mean
    slope = (qc * (target - t_mean)).sum(dims, keepdim=True) / qc.square().sum(dims, keepdim=True)
    valid = torch.isfinite(slope) & (slope > 0)
    slope = torch.where(valid, slope, ratio)
    return slope, torch.where(valid, q_mean - t_mean / slope, zero)


def _fit_ratio(x, q, ratio, zero, dims) -> torch.Tensor:
    """The least-squares ``ratio`` of ``x ~ ratio * (q - zero)`` per block (the previous one where undefined)."""
    centred = q if zero is None else q - zero
    fit = (x * centred).sum(dims, keepdim=True) / centred.square().sum(dims, keepdim=True)
    return torch.where(torch.isfinite(fit) & (fit > 0), fit, ratio)


def _squared_error(w, scale, zero, block_size, qt: QType) -> torch.Tensor:
    error = w.float() - dequantize(quantize(w, scale, zero, block_size, qt), scale, zero, block_size)
    return to_blocks(error.square_(), block_size).sum(block_dims(w.dim()))
