"""Intx weights (1..8-bit codes in groups, canonical bit stream) on lowbit's native AVX-512 kernels.

Packing (once per weight, :func:`pack_planes`) turns each row's bit stream into bit planes: per 64 codes, ``bits``
64-bit masks, plane p holding bit p of the 64 unsigned codes (signed codes offset by 2^(bits-1), an implied zero
point), the codes of each 256 ordered so that a VNNI lane stays within one group (native/intx.c). A
64-code block then decodes in two instructions whatever the width (a byte permute and a GF(2) affine bit
transpose, AVX512-VBMI + GFNI), so the few-row GEMV reads ``bits`` / 8 bytes per weight and its time falls with
the width. Few rows: one fused C call on a per-token 16-bit split of the activation (two int8 halves,
:func:`lowbit.kernels.cpu.split_activation_16bit`), VNNI products on the unsigned codes, per-group int32 sums
scaled in float, the zero point through the per-group sums of the activation codes, and the bias. More rows: the
planes decoded to bf16 a panel at a time inside an AVX512-BF16 GEMM (:mod:`.decode_gemm`).

Non-finite activations follow the rule of every kernel (:mod:`lowbit.kernels.reference`): the native 16-bit
split and the bf16 conversion give a row holding a NaN a NaN scale (all its outputs NaN) and saturate +-inf at
the row's largest finite magnitude.
"""

from __future__ import annotations

import torch

from ..primitives.packing import pack_bits, unpack_bits
from ..primitives.qtypes import get_qtype
from . import decode_gemm, native
from .avx512 import _decoded_linear, _lib, _ptr, _rows, _vector
from .cpu import PACK_ROWS, finish
from .ops import custom_op
from .registry import register_kernel

GEMV_ROWS_INTX = 8  # rows up to which the memory-bound GEMV beats decode + GEMM (as for int4)
GROUP_SIZES = (32, 64, 128, 256)  # the GEMV sums a group in int32: exact up to 256 codes of 7 bits
PLANE_DECODE_FLAGS = ("avx512vbmi", "gfni")


def plane_decode_unavailable(device_type: str = "cpu") -> str | None:
    """None when the native kernels run here and the CPU decodes bit planes (AVX512-VBMI, GFNI), else why not."""
    return native.unavailable_without(PLANE_DECODE_FLAGS, "to decode bit planes", device_type)


def _row_streams(tensors, meta) -> torch.Tensor:
    """qdata as one bit stream per weight row, (N, ceil(K * bits / 8)) contiguous: as stored, or re-packed in
    blocks of rows when the weight was packed along dim 0 (a transposed view of an (in, out) weight)."""
    qdata, bits = tensors["qdata"], get_qtype(meta["qtype"]).bits
    if meta["packed_dim"] == 1:
        return qdata.contiguous()
    n = meta["shape"][0]
    streams = []
    for row0 in range(0, n, PACK_ROWS):  # PACK_ROWS rows are PACK_ROWS * bits / 8 whole bytes along dim 0
        rows = min(PACK_ROWS, n - row0)
        chunk = qdata[row0 * bits // 8 : -(-(row0 + rows) * bits // 8)]
        streams.append(pack_bits(unpack_bits(chunk, bits, rows, signed=False, dim=0), bits))
    return torch.cat(streams)


def pack_planes(tensors, meta) -> dict:
    """The canonical bit stream of an (N, K) intx weight -> ``{"packed": planes}``, uint8 (N, ceil(K / 256) * 32 * bits)
    (as many bytes as the stream, up to the zero codes padding K to a multiple of 256)."""
    qt = get_qtype(meta["qtype"])
    n, k = meta["shape"]
    streams = _row_streams(tensors, meta)
    planes = torch.empty(n, -(-k // 256) * 32 * qt.bits, dtype=torch.uint8)
    flip = 1 << (qt.bits - 1) if qt.qmin < 0 else 0  # two's complement -> offset binary
    _lib().lowbit_intx_pack_planes(streams.data_ptr(), planes.data_ptr(), n, k, qt.bits, flip, torch.get_num_threads())
    return {"packed": planes}


@custom_op("lowbit::intx_gemv")
def intx_gemv(x: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
              bias: torch.Tensor | None, group_size: int, bits: int) -> torch.Tensor:
    """Weight-only intx for a few rows, float32 (M, N), in one C call: a 16-bit split of x (M, K), VNNI
    products on the bit planes (N, ceil(K / 256) * 32 * bits), group scales (N, K / G), zero points (uint8
    (N, K / G), or the implied 2^(bits-1) of signed codes when None) and bias."""
    x = x.contiguous().float()
    (m, k), n = x.shape, planes.shape[0]
    zero, bias = None if zero_point is None else zero_point.contiguous(), _vector(bias)
    scale, out = scale.float().contiguous(), torch.empty(m, n, dtype=torch.float32)
    _lib().lowbit_intx_linear_small(x.data_ptr(), planes.contiguous().data_ptr(), scale.data_ptr(), _ptr(zero), _ptr(bias),
                                    out.data_ptr(), m, n, k, group_size, bits, torch.get_num_threads())
    return out


@intx_gemv.register_fake
def _(x, planes, scale, zero_point, bias, group_size, bits):
    return x.new_empty(x.shape[0], planes.shape[0], dtype=torch.float32)


@custom_op("lowbit::intx_decoded_linear")
def intx_decoded_linear(x: torch.Tensor, planes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        bias: torch.Tensor | None, group_size: int, bits: int, bf16_out: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T + bias, float32 (M, N) or bf16 with ``bf16_out``, with W's bit planes decoded to bf16
    ((q - zero) * scale rounded once) inside the GEMM (:func:`.decode_gemm.intx_decode_gemm`), or a block of rows at a
    time for oneDNN's bf16 GEMM where the CPU has no AVX512-BF16."""
    planes, scale = planes.contiguous(), scale.float().contiguous()
    zero = None if zero_point is None else zero_point.contiguous()
    (n, k), threads = (planes.shape[0], x.shape[-1]), torch.get_num_threads()

    def decode(row0, count, dst):
        _lib().lowbit_intx_rows_to_bf16(planes.data_ptr(), scale.data_ptr(), _ptr(zero), dst, k, group_size, bits, row0,
                                        count, threads)

    def fused(rows, row_scale):
        return decode_gemm.intx_decode_gemm(rows, row_scale, planes, scale, zero, bias, group_size, bits, bf16_out)

    bias = _vector(bias)
    return _decoded_linear(x, n, decode, fused, bias=bias, bf16_out=bf16_out)


@intx_decoded_linear.register_fake
def _(x, planes, scale, zero_point, bias, group_size, bits, bf16_out=False):
    return x.new_empty(x.shape[0], planes.shape[0], dtype=torch.bfloat16 if bf16_out else torch.float32)


@register_kernel("linear", "intx", "avx512", devices=("cpu",), priority=20, granularities=("per_group",),
                 requires=plane_decode_unavailable, pack=pack_planes, group_sizes=GROUP_SIZES.__contains__)
def intx_weight_avx512(x, tensors, meta, bias):
    """Weight-only intx: GEMV on bit planes and a 16-bit activation split for few rows, bf16 decode + GEMM above."""
    (n, k), group = meta["shape"], meta["block_size"][-1]
    if x.shape[-1] != k:
        raise ValueError(f"linear of input {tuple(x.shape)} with an intx weight of shape {(n, k)}: expected {k} input features")
    planes = tensors.get("packed")
    if planes is None:  # a view that left the packed layout behind (e.g. the transpose of a Conv1D weight)
        planes = pack_planes(tensors, meta)["packed"]
    x2d, fused_bias = x.reshape(-1, k), None if bias is None else bias.detach()
    args = (x2d, planes, tensors["scale"], tensors.get("zero_point"), fused_bias, group, get_qtype(meta["qtype"]).bits)
    if _rows(x) <= GEMV_ROWS_INTX:
        return finish(intx_gemv(*args), x)
    return finish(intx_decoded_linear(*args, x.dtype == torch.bfloat16), x)
