"""GPTQ (Frantar et al. 2022): quantize a linear weight one input column at a time, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer's inputs.

The Hessian ``H = 2 X^T X / n`` is accumulated in float32 as a running mean over calibration tokens
(:class:`HessianCollector`), so it stays O(1) in magnitude however many tokens arrive. Numerical guard: columns
whose inputs were always zero ("dead") are zeroed in the weight (exactly representable, so no error flows from
them); ``damping`` times the mean diagonal is added to the diagonal before the Cholesky factorisation, and if the factorisation still fails (an
ill-conditioned H) the damping is raised tenfold, up to :data:`MAX_DAMPING`, before giving up with an error.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.affine import dequantize, quantize
from ..primitives.blocks import block_dims, to_blocks
from ..primitives.qtypes import get_qtype
from ..specs import WeightSpec
from .clipping import shrunk_qparams

MAX_DAMPING = 1.0  # the largest fraction of the mean diagonal added to H before the Cholesky factorisation gives up
CLIP_NORM = 2.4  # the reconstruction error's exponent when a block's range is shrunk (GPTQ's reference quantizer)


def clipped_qparams(w: torch.Tensor, block_size: Sequence[int], qtype, *, symmetric: bool, steps: int):
    """Per block, the min/max qparams of the block's range shrunk by the factor in ``1, 1 - 0.2/steps, ..., 0.8``
    (``steps`` + 1 candidates) that minimizes ``sum |w - Q(w)|^2.4`` over the block; ``steps=0`` is min/max.

    Example:
        >>> w = torch.randn(4, 64)
        >>> full, _ = clipped_qparams(w, (1, 32), "uint3", symmetric=False, steps=0)
        >>> clipped, _ = clipped_qparams(w, (1, 32), "uint3", symmetric=False, steps=10)
        >>> bool((clipped <= full).all())
        True
    """
    return shrunk_qparams(w, block_size, qtype, symmetric=symmetric, steps=steps, narrowest=0.8,
                          error=lambda scale, zero: _block_error(w, scale, zero, block_size, qtype))


def _block_error(w, scale, zero, block_size, qtype) -> torch.Tensor:
    error = (w.float() - dequantize(quantize(w, scale, zero, block_size, qtype), scale, zero, block_size)).abs()
    return to_blocks(error.pow_(CLIP_NORM), block_size).sum(block_dims(w.dim()))


class HessianCollector:
    """Running ``2 X^T X / n`` of a linear layer's inputs ``X`` (tokens, K), in float32."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (M, K)
        x = x[torch.isfinite(x).all(-1)]  # a token with inf/NaN would poison H: it is skipped
        m = x.shape[0]
        if m == 0:
            return
        total = self.tokens + m
        self.hessian.mul_(self.tokens / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``, the damping raised until it factors."""
    mean_diag = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    while True:
        factor, info = torch.linalg.cholesky_ex(hessian + damping * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        if damping >= MAX_DAMPING:
            raise ValueError(f"GPTQ: the input Hessian is not positive definite even with damping {damping} of its mean "
                             f"diagonal; expected calibration inputs spanning the layer's input features")
        damping = min(damping * 10, MAX_DAMPING)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, block_size: Sequence[int], *,
                  damping: float = 0.01, act_order: bool = False, block_columns: int = 128, clip_steps: int = 0):
    """GPTQ on a linear weight (N, K): returns ``(w_hat, scale, zero_point)`` where ``w_hat`` (N, K) float32 holds
    values on the spec's grid, ``quantize(w_hat, scale, zero_point)`` giving the integer (or float8) codes.

    Group qparams follow the scheme's layout (contiguous groups of ``block_size[-1]`` input features), so the
    result runs on the scheme's own kernels. Without ``act_order`` each group's qparams are chosen from the
    already-updated weights when GPTQ reaches the group; with ``act_order`` (columns in order of decreasing
    Hessian diagonal) they are chosen up front from the weight, as per-channel and per-tensor qparams always are.
    Updates are lazy in blocks of ``block_columns`` columns (a multiple of the group size). ``clip_steps`` > 0
    shrinks each block's range as :func:`clipped_qparams` does (integer qtypes).

    Example:
        >>> from lowbit.specs import weight_spec
        >>> x = torch.randn(256, 64)
        >>> w_hat, scale, zp = gptq_quantize(torch.randn(8, 64), 2 * x.t() @ x / 256, weight_spec("int4", "uint4", 32), (1, 32))
        >>> tuple(w_hat.shape), tuple(scale.shape)
        ((8, 64), (8, 2))
    """
    qt = get_qtype(spec.qtype)
    w = weight.detach().float().clone()  # (N, K)
    n, k = w.shape
    h = hessian.detach().float().to(w.device)
    dead = h.diagonal() == 0
    w[:, dead] = 0.0  # no input ever reached them: zero is exact, so their columns pass no error on
    group = block_size[-1] if spec.granularity == "per_group" else k
    lazy_groups = spec.granularity == "per_group" and not act_order
    if lazy_groups:
        scale = torch.empty(n, k // group, dtype=torch.float32, device=w.device)
        zero_point = None if spec.symmetric else torch.empty(n, k // group, dtype=qt.storage, device=w.device)
    else:
        scale, zero_point = clipped_qparams(w, block_size, qt, symmetric=spec.symmetric, steps=clip_steps)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    h_inv = _inverse_hessian_factor(h[order][:, order], damping)  # (K, K) upper
    # work on the transpose (K, N): a column of the weight is a contiguous row here
    wt, w_hat = w.t()[order].contiguous(), torch.empty(k, n, dtype=torch.float32, device=w.device)
    row_scale, row_zero = _column_params(scale, zero_point, block_size, (n, k))
    columns = max(block_columns // group, 1) * group if lazy_groups else block_columns
    for start in range(0, k, columns):
        end = min(start + columns, k)
        block, errors, h_block = wt[start:end], torch.empty(end - start, n, device=w.device), h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if lazy_groups and col % group == 0:  # the group's qparams from its already-updated weights
                g_scale, g_zero = clipped_qparams(block[i:i + group].t(), (1, group), qt, symmetric=spec.symmetric,
                                                  steps=clip_steps)
                scale[:, col // group], row_scale[col:col + group] = g_scale[:, 0], g_scale[:, 0]
                if zero_point is not None:
                    zero_point[:, col // group], row_zero[col:col + group] = g_zero[:, 0], g_zero[:, 0]
            source = col if lazy_groups else order[col]
            s, z = row_scale[source, None], None if row_zero is None else row_zero[source, None]  # (1, N)
            q = dequantize(quantize(block[i, None], s, z, (1, 1), qt), s, z, (1, 1))[0]  # (N,)
            w_hat[col] = q
            errors[i] = (block[i] - q) / h_block[i, i]
            block[i:].addr_(h_block[i, i:], errors[i], alpha=-1.0)  # spread the error over the block's later columns
        wt[end:].addmm_(h_inv[start:end, end:].t(), errors, alpha=-1.0)  # and, lazily, over the columns after it
    restored = torch.empty_like(w_hat)
    restored[order] = w_hat
    return restored.t().contiguous(), scale, zero_point


def _column_params(scale, zero_point, block_size, shape):
    """Block qparams per weight column, as rows (K, N) of scale and zero point (lazily chosen groups fill them later)."""
    n, k = shape
    rows, cols = block_size[0] if len(block_size) == 2 else 1, block_size[-1]
    expand = lambda p: p.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k].t().contiguous()  # noqa: E731
    return expand(scale), None if zero_point is None else expand(zero_point)
