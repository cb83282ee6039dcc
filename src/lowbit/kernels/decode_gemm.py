"""Weight-only GEMMs for more than a few activation rows (native/decode_gemm.c): the quantized weight is decoded
to bf16 one cache-sized panel at a time inside the GEMM and multiplied with AVX512-BF16 dot products, so no call
decodes the whole weight.

Every op takes the activation as bf16 rows (M, K) with a per-row scale (M,) (:func:`lowbit.kernels.avx512.bf16_rows`
or ``float8_rows(..., bf16=True)`` make both: a row holding a NaN has scale NaN, which makes all its outputs NaN) and
returns ``rows @ W^T * w_scale * row_scale + bias`` (M, N) in float32, or bf16 (round half to even) when ``bf16_out``.
Decoded weights are exactly what a bf16 decode gives: int8 and float8 e4m3 values exact, int4 ``(q - zero) * scale``
rounded to bf16 half to even; products are exact and summed in float32.
"""

from __future__ import annotations

import torch

from . import native
from .ops import custom_op

BF16_FLAGS = ("avx512_bf16",)


def unavailable(device_type: str = "cpu") -> str | None:
    """None when the decode GEMMs can run here (the native library and AVX512-BF16), else why not."""
    return native.unavailable_without(BF16_FLAGS, "for its bf16 dot products", device_type)


def _prepare(rows: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None, n: int, bf16_out: bool):
    """Checked, contiguous arguments and the output (M, N) for the C kernels."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"lowbit's decode GEMM cannot run here: {reason}")
    if rows.dtype != torch.bfloat16 or rows.dim() != 2:
        raise ValueError(f"decode GEMMs take bf16 activation rows (M, K); received {rows.dtype} of shape {tuple(rows.shape)}")
    if row_scale.numel() != rows.shape[0]:
        raise ValueError(f"row_scale needs one value per activation row ({rows.shape[0]}); received {row_scale.numel()}")
    row_scale = row_scale.detach().reshape(-1).float().contiguous()
    bias = None if bias is None else bias.detach().reshape(-1).float().contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16 if bf16_out else torch.float32)
    return rows.contiguous(), row_scale, bias, out


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _fake(rows, n, bf16_out):
    return rows.new_empty(rows.shape[0], n, dtype=torch.bfloat16 if bf16_out else torch.float32)


def _byte_weight_gemm(kernel, rows, row_scale, weight, w_scale, bias, bf16_out) -> torch.Tensor:
    """The decode GEMMs of one-byte weights (N, K) with one scale per row (or one for all, expanded)."""
    (n, k), m = weight.shape, rows.shape[0]
    rows, row_scale, bias, out = _prepare(rows, row_scale, bias, n, bf16_out)
    weight, w_scale = weight.contiguous(), w_scale.detach().reshape(-1).float().expand(n).contiguous()
    kernel(rows.data_ptr(), row_scale.data_ptr(), weight.data_ptr(), w_scale.data_ptr(), _ptr(bias), out.data_ptr(),
           int(bf16_out), m, n, k, torch.get_num_threads())
    return out


@custom_op("lowbit::int8_decode_gemm")
def int8_decode_gemm(rows: torch.Tensor, row_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, bf16_out: bool) -> torch.Tensor:
    """rows (M, K) bf16 @ weight (N, K) int8 ^T * w_scale (N,) * row_scale (M,) + bias (N,)."""
    return _byte_weight_gemm(native.library().lowbit_int8_decode_gemm, rows, row_scale, weight, w_scale, bias, bf16_out)


@int8_decode_gemm.register_fake
def _(rows, row_scale, weight, w_scale, bias, bf16_out):
    return _fake(rows, weight.shape[0], bf16_out)


@custom_op("lowbit::fp8_decode_gemm")
def fp8_decode_gemm(rows: torch.Tensor, row_scale: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, bf16_out: bool) -> torch.Tensor:
    """rows (M, K) bf16 @ e4m3fn codes (N, K, as uint8) ^T * w_scale (N,) or (1,) * row_scale (M,) + bias (N,)."""
    return _byte_weight_gemm(native.library().lowbit_fp8_decode_gemm, rows, row_scale, codes, w_scale, bias, bf16_out)


@fp8_decode_gemm.register_fake
def _(rows, row_scale, codes, w_scale, bias, bf16_out):
    return _fake(rows, codes.shape[0], bf16_out)


@custom_op("lowbit::int4_decode_gemm")
def int4_decode_gemm(rows: torch.Tensor, row_scale: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                     bf16_out: bool) -> torch.Tensor:
    """rows (M, K) bf16 @ W^T * row_scale (M,) + bias (N,) for packed (N, K/2) 4-bit weights (low nibble = even k)
    with group scales (N, K/G) and uint8 zero points (N, K/G), or signed codes without them; G a multiple of 32."""
    n, k, m = packed.shape[0], 2 * packed.shape[1], rows.shape[0]
    if group_size % 32 or k % group_size:
        raise ValueError(f"the int4 decode GEMM takes groups of a multiple of 32 codes dividing K={k}; received {group_size}")
    rows, row_scale, bias, out = _prepare(rows, row_scale, bias, n, bf16_out)
    packed, scale = packed.contiguous(), scale.detach().float().contiguous()
    zero = None if zero_point is None else zero_point.contiguous()
    native.library().lowbit_int4_decode_gemm(rows.data_ptr(), row_scale.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                                             _ptr(zero), _ptr(bias), out.data_ptr(), int(bf16_out), m, n, k, group_size,
                                             torch.get_num_threads())
    return out


@int4_decode_gemm.register_fake
def _(rows, row_scale, packed, scale, zero_point, bias, group_size, bf16_out):
    return _fake(rows, packed.shape[0], bf16_out)


@custom_op("lowbit::intx_decode_gemm")
def intx_decode_gemm(rows: torch.Tensor, row_scale: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor | None, bias: torch.Tensor | None, group_size: int, bits: int,
                     bf16_out: bool) -> torch.Tensor:
    """rows (M, K) bf16 @ W^T * row_scale (M,) + bias (N,) for intx bit planes (N, ceil(K / 256) * 32 * bits)
    (:func:`lowbit.kernels.intx.pack_planes`; decoding them needs AVX512-VBMI and GFNI) with group scales (N, K/G)
    and uint8 zero points (N, K/G), or the implied 2^(bits-1) of signed codes without them."""
    n, (m, k) = planes.shape[0], rows.shape
    rows, row_scale, bias, out = _prepare(rows, row_scale, bias, n, bf16_out)
    planes, scale = planes.contiguous(), scale.detach().float().contiguous()
    zero = None if zero_point is None else zero_point.contiguous()
    native.library().lowbit_intx_decode_gemm(rows.data_ptr(), row_scale.data_ptr(), planes.data_ptr(), scale.data_ptr(),
                                             _ptr(zero), _ptr(bias), out.data_ptr(), int(bf16_out), m, n, k, group_size, bits,
                                             torch.get_num_threads())
    return out


@intx_decode_gemm.register_fake
def _(rows, row_scale, planes, scale, zero_point, bias, group_size, bits, bf16_out):
    return _fake(rows, planes.shape[0], bf16_out)
