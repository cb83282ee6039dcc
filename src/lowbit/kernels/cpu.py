"""Fast CPU kernels built on integer GEMMs that ship inside PyTorch (``torch._int_mm``, oneDNN).

Numerics guarantees: integer products accumulate in int32 without saturation (full 8-bit range,
no ``reduce_range``); activation scales follow the same primitives as the reference path, so the
two agree up to float rounding of the final scaling. Non-finite activations follow the rule of every
kernel (:mod:`lowbit.kernels.reference`): a row holding a NaN gets a NaN scale, so all its outputs are NaN;
+-inf saturate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives.affine import choose_qparams, quantize
from .native import cpu_flags
from .reference import nan_rows
from .registry import register_kernel

_TINY = torch.finfo(torch.float32).tiny
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def needs_vnni(device_type: str) -> str | None:
    """oneDNN's int8 GEMM accumulates in int32 only on VNNI/AMX CPUs; elsewhere int16 steps may saturate."""
    if not any(flag in cpu_flags() for flag in _VNNI_FLAGS):
        return f"needs a CPU with one of {list(_VNNI_FLAGS)} (without them int8 products can saturate)"
    return None
_SPLIT_MAX = 127 * 256 + 127  # largest 16-bit value whose high byte stays in int8


def quantize_activation_int8(x2d: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dynamic int8 quantization of a (M, K) activation: ``(q int8, scale (M, 1), zero_point float or None)``,
    the scale NaN for rows holding a NaN (as the native row quantizers report them)."""
    block = (1, x2d.shape[1]) if act.granularity == "per_token" else tuple(x2d.shape)
    scale, zero_point = choose_qparams(x2d, block, "int8", symmetric=act.symmetric, ignore_nonfinite=True)
    q = quantize(x2d, scale, zero_point, block, "int8", saturate_nonfinite=True)
    return q, _nan_rows_scale(scale, x2d), None if zero_point is None else zero_point.float()


def _nan_rows_scale(scale: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """A (M, 1) or (1, 1) activation scale as (M, 1), NaN for the rows of x2d holding a NaN: the epilogue's
    multiplication then makes every output of such a row NaN (the non-finite rule, :mod:`.reference`)."""
    return torch.where(nan_rows(x2d), float("nan"), scale)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a (M, K), b (K, N))``: exact int32 (M, N) products of int8 matrices. oneDNN's GEMM
    behind it returns garbage for K = 1 (measured on PyTorch 2.13, AMX and AVX-512 CPUs), so there a zero
    column pads K to 2 (adding 0 keeps the sums exact)."""
    if a.shape[1] == 1:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 0, 0, 1))
    return torch._int_mm(a, b)


PACK_ROWS = 256  # packing works on this many weight rows at a time: temporaries stay small


def weight_colsum(tensors, meta) -> dict:
    """Per-output-row sum of int8 weights, for the activation zero-point correction: int32 (N,), exact, and kept
    so when a module swap's buffers follow ``model.to(torch.bfloat16)`` (bf16 would round sums above 256)."""
    sums = [rows.sum(-1, dtype=torch.int32) for rows in tensors["qdata"].split(PACK_ROWS)]
    return {"packed_aux": torch.cat(sums)}


def colsum(tensors) -> torch.Tensor:
    """The packed row sums as float32 (exact: |sum| <= 128 K); recomputed only for views (e.g. ``x @ w.t()``)
    that dropped them."""
    packed = tensors.get("packed_aux")
    return (packed if packed is not None else weight_colsum(tensors, None)["packed_aux"]).float()


def finish(out: torch.Tensor, x: torch.Tensor, scale=None, bias=None) -> torch.Tensor:
    """(M, N) float32 -> x's leading shape and dtype, after a per-column weight scale and the bias."""
    if scale is not None:
        out = out * scale.reshape(1, -1).float()
    if bias is not None:
        out = out + bias.float()
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], -1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


@register_kernel("linear", "int8_dynamic", "int_mm", devices=("cpu",), priority=10,
                 granularities=("per_row",), pack=weight_colsum, requires=needs_vnni)
def int8_dynamic_int_mm(x, tensors, meta, bias):
    """int8 x int8 -> int32 GEMM; y = (acc - zp_x * colsum_w) * s_x * s_w + bias."""
    x2d = x.reshape(-1, x.shape[-1])
    q, x_scale, x_zero = quantize_activation_int8(x2d, meta["activation"])
    acc = int_mm(q, tensors["qdata"].t()).float()  # (M, N) exact int32 sums
    if x_zero is not None:
        acc = acc - x_zero * colsum(tensors)
    return finish(acc * x_scale.float(), x, tensors["scale"], bias)


def split_activation_16bit(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token 16-bit quantization split in two int8 halves: ``x = scale * (256 * hi + lo)``.

    Returns float tensors ``(scale (M, 1), hi, lo)`` with hi in [-127, 127] and lo in [-128, 127];
    the resolution is 1/32639 of each row's maximum. +-inf saturate, NaN becomes 0 and its row's scale NaN.
    """
    x2d = x2d.float()
    stats = torch.nan_to_num(x2d, nan=0.0, posinf=0.0, neginf=0.0)
    scale = (stats.abs().amax(-1, keepdim=True) / _SPLIT_MAX).clamp(min=_TINY)  # (M, 1)
    xi = torch.nan_to_num(torch.round(x2d / scale), nan=0.0).clamp(-_SPLIT_MAX, _SPLIT_MAX)
    hi = torch.floor((xi + 128) / 256)
    return _nan_rows_scale(scale, x2d), hi, xi - 256 * hi


@register_kernel("linear", "int8", "int_mm16", devices=("cpu",), priority=10, granularities=("per_row",),
                 requires=needs_vnni)
def int8_weight_int_mm16(x, tensors, meta, bias):
    """Weight-only int8 through two int8 GEMMs on a 16-bit split of the activation.

    The activation keeps 1/32639 of its row maximum as resolution: far below the int8 weight error.
    """
    scale, hi, lo = split_activation_16bit(x.reshape(-1, x.shape[-1]))
    w_t = tensors["qdata"].t()
    acc = int_mm(hi.to(torch.int8), w_t).float() * 256 + int_mm(lo.to(torch.int8), w_t).float()
    return finish(acc * scale, x, tensors["scale"], bias)
