"""CPU kernels on lowbit's native AVX-512 library plus PyTorch's bf16 and int4 GEMMs.

Small batches (a few rows) are memory bound: a GEMV decodes int8/float8 weights in
registers and reads each weight byte once. Larger batches are compute bound: weights are decoded
to bfloat16 (exact for int8 and float8; int4 values times their scale rounded to bf16) panel by panel
inside an AVX512-BF16 GEMM (:mod:`lowbit.kernels.decode_gemm`); CPUs without AVX512-BF16 decode blocks
of rows for oneDNN's bf16 GEMM, and int8 weights there go through two int8 GEMMs (:mod:`lowbit.kernels.cpu`).

Non-finite activations follow the rule of every kernel (:mod:`lowbit.kernels.reference`): the native row
quantizers and the bf16 conversion report a row holding a NaN by a NaN row scale, which the epilogues
multiply into every output of the row; +-inf saturate at the row's range (the float8 GEMV saturates its
float activations before the products).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..primitives.affine import choose_qparams
from . import decode_gemm, native
from .cpu import colsum, finish, int_mm, weight_colsum
from .ops import custom_op
from .registry import Call, register_kernel

# Rows up to which a memory-bound GEMV beats the decode GEMM (measured on Zen 4, 4096x4096 and 4096x11008: at 8 rows
# the float8 GEMV gave 0.58-0.70x bf16 and the GEMM 0.80-0.98x; int8 and int4 were even there, their GEMVs ahead at 4).
GEMV_ROWS_INT8 = 8
GEMV_ROWS_FLOAT8 = 4
GEMV_ROWS_INT4 = 8


def _lib():
    lib = native.library()
    if lib is None:
        raise RuntimeError(f"lowbit's native CPU kernels are unavailable: {native.unavailable()}")
    return lib


@custom_op("lowbit::float8_gemv")
def float8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y (M, N) = (x (M, K) @ weight (N, K)^T) * scale (N,) + bias for e4m3 codes (as uint8) and a few rows,
    the codes decoded in registers (by byte-table lookup where the CPU has AVX512-VBMI); +-inf in x saturate
    at their row's largest finite magnitude."""
    x = x.contiguous().float()
    weight = weight.contiguous()
    scale, bias = _vector(scale).expand(weight.shape[0]).contiguous(), _vector(bias)
    (m, k), n = x.shape, weight.shape[0]
    out, threads = torch.empty(m, n, dtype=torch.float32), torch.get_num_threads()
    kernel = _lib().lowbit_fp8_gemv_table if native.has_table_decode() else _lib().lowbit_fp8_gemv
    kernel(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), _ptr(bias), out.data_ptr(), m, n, k, threads)
    return out


@float8_gemv.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


CHUNK_BYTES = 8 << 20  # decoded bf16 weight rows per GEMM call: cache-resident scratch
_SCRATCH = threading.local()  # one chunk buffer per thread, allocated once: no page faults per call


def _scratch(numel: int) -> torch.Tensor:
    buffer = getattr(_SCRATCH, "bf16", None)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            buffer = _SCRATCH.bf16 = torch.empty(max(numel, CHUNK_BYTES // 2), dtype=torch.bfloat16)
    return buffer[:numel]


def activation_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the native kernels read activations: contiguous bfloat16 kept as it is (bf16 models stay in
    bf16: no widening pass), any other float dtype as float32."""
    return x.contiguous() if x.dtype == torch.bfloat16 else x.contiguous().float()


def out_dtype(x: torch.Tensor) -> torch.dtype:
    """What the native linears write for activations ``x``: bfloat16 for bf16 input, float32 otherwise."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def is_bf16(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def bf16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float activations (M, K) rounded to bf16 for a bf16 GEMM by the non-finite rule: ``(rows, row_scale (M,))``
    with +-inf saturated at the row's largest finite magnitude, and row_scale NaN for a row holding a NaN
    (its outputs become NaN in the epilogue), else 1."""
    x = activation_rows(x)
    rows, row_scale = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape[0])
    _lib().lowbit_rows_to_bf16(x.data_ptr(), rows.data_ptr(), row_scale.data_ptr(), x.shape[0], x.shape[1], is_bf16(x),
                               torch.get_num_threads())
    return rows, row_scale


def _decoded_linear(x: torch.Tensor, n: int, decode_rows, fused, w_scale=None, row_scale=None, bias=None,
                    bf16_out: bool = False) -> torch.Tensor:
    """(M, K) @ W^T * ``w_scale`` (N,) * ``row_scale`` (M,) + ``bias`` -> (M, N) float32 (bf16 with ``bf16_out``), W
    decoded to bf16 inside the GEMM by ``fused(rows, row_scale)`` (:mod:`.decode_gemm`) where the CPU has AVX512-BF16;
    elsewhere W is decoded one cache-sized block of rows at a time by ``decode_rows`` for oneDNN's bf16 GEMM, then per
    block one pass for the widening, the scales and the bias. Without ``row_scale`` x holds float activations, rounded to bf16 here
    (:func:`bf16_rows`); with it, x holds values exact in bf16 (rounded to float8) and row_scale their per-row scale."""
    if row_scale is None:
        x, row_scale = bf16_rows(x)
    x = x.to(torch.bfloat16).contiguous()
    if decode_gemm.unavailable() is None:
        return fused(x, row_scale)
    (m, k), threads = x.shape, torch.get_num_threads()
    rows = max(16, CHUNK_BYTES // (2 * k))
    scratch = _scratch(min(rows, n) * k).view(-1, k)
    out = torch.empty(m, n, dtype=torch.float32)
    for row0 in range(0, n, rows):
        count = min(rows, n - row0)
        decode_rows(row0, count, scratch.data_ptr())
        acc = F.linear(x, scratch[:count])
        _lib().lowbit_bf16_epilogue(acc.data_ptr(), _offset_ptr(w_scale, row0), _ptr(row_scale), _offset_ptr(bias, row0),
                                    out.data_ptr() + 4 * row0, m, count, n, threads)
    return out.to(torch.bfloat16) if bf16_out else out


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 contiguous 1-D copy (or view) of ``t`` for the C kernels, outside autograd."""
    return None if t is None else t.detach().reshape(-1).float().contiguous()


@custom_op("lowbit::fp8_decoded_linear")
def fp8_decoded_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, row_scale: torch.Tensor | None,
                       bias: torch.Tensor | None, bf16_out: bool = False) -> torch.Tensor:
    """x (M, K) @ decode(codes (N, K) e4m3 as uint8)^T * scale (* row_scale (M, 1)) + bias through bf16
    (exact decode), float32 (M, N), or bf16 with ``bf16_out``."""
    codes = codes.contiguous()
    n, k = codes.shape
    threads = torch.get_num_threads()
    w_scale, bias = _vector(scale).expand(n).contiguous(), _vector(bias)
    return _decoded_linear(x, n, lambda row0, count, dst: _lib().lowbit_fp8_rows_to_bf16(codes.data_ptr(), dst, k, row0, count, threads),
                           lambda rows, row_scale: decode_gemm.fp8_decode_gemm(rows, row_scale, codes, w_scale, bias, bf16_out),
                           w_scale, _vector(row_scale), bias, bf16_out)


@fp8_decoded_linear.register_fake
def _(x, codes, scale, row_scale, bias, bf16_out=False):
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.bfloat16 if bf16_out else torch.float32)


@custom_op("lowbit::int4_decoded_linear")
def int4_decoded_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                        bias: torch.Tensor | None, group_size: int, bf16_out: bool = False) -> torch.Tensor:
    """x (M, K) @ W^T + bias for packed (N, K/2) 4-bit weights with per-group scale (and uint8 zero point), float32
    (M, N) or bf16 with ``bf16_out``."""
    packed, scale = packed.contiguous(), scale.float().contiguous()
    zero = None if zero_point is None else zero_point.contiguous()
    n, k = packed.shape[0], packed.shape[1] * 2
    threads = torch.get_num_threads()

    def decode(row0, count, dst):
        _lib().lowbit_int4_rows_to_bf16(packed.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                                        dst, k, group_size, row0, count, threads)

    def fused(rows, row_scale):
        return decode_gemm.int4_decode_gemm(rows, row_scale, packed, scale, zero, bias, group_size, bf16_out)

    bias = _vector(bias)
    return _decoded_linear(x, n, decode, fused, bias=bias, bf16_out=bf16_out)


@int4_decoded_linear.register_fake
def _(x, packed, scale, zero_point, bias, group_size, bf16_out=False):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.bfloat16 if bf16_out else torch.float32)


def _rows(x) -> int:
    return x.numel() // x.shape[-1]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _offset_ptr(t: torch.Tensor | None, start: int):
    """Address of float32 element ``start`` of ``t`` (None for None)."""
    return None if t is None else t.data_ptr() + 4 * start


def _epilogue(acc, acc_hi, x_scale, offset, row_sums, w_scale, bias, threads, dtype=torch.float32) -> torch.Tensor:
    """Scales, zero-point correction and bias on integer products, written as ``dtype`` (float32 or bf16)."""
    out = torch.empty(acc.shape, dtype=dtype)
    _lib().lowbit_int32_epilogue(acc.data_ptr(), _ptr(acc_hi), x_scale.data_ptr(), _ptr(offset), row_sums.data_ptr(),
                                 w_scale.data_ptr(), _ptr(bias), out.data_ptr(), acc.shape[0], acc.shape[1],
                                 int(acc.dtype == torch.float32), int(dtype == torch.bfloat16), threads)
    return out


def _int8_small(x, weight, w_scale, row_sums, bias, mode: int, fixed_scale=0.0, fixed_zero=0.0, divisor=None) -> torch.Tensor:
    """The one-call C path for few rows: activation quantization, VNNI GEMV and epilogue fused (float32 inside;
    a few rows widened, divided by the smoothing ``divisor`` and narrowed around it cost nothing next to the weight read)."""
    x32, (m, k), n = x.float() if divisor is None else x.float() / divisor, x.shape, weight.shape[0]
    weight, out = weight.contiguous(), torch.empty(m, n, dtype=torch.float32)  # the C kernel reads rows of stride k
    _lib().lowbit_int8_linear_small(x32.data_ptr(), weight.data_ptr(), w_scale.data_ptr(), row_sums.data_ptr(), _ptr(bias),
                                    out.data_ptr(), m, n, k, mode, fixed_scale, fixed_zero, int(native.amx_ready()),
                                    torch.get_num_threads())
    return out.to(out_dtype(x))


@custom_op("lowbit::int8_activation_linear")
def int8_activation_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, row_sums: torch.Tensor,
                           bias: torch.Tensor | None, symmetric: bool, act_scale: torch.Tensor | None = None,
                           act_zero: torch.Tensor | None = None, act_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """int8 x int8 linear, (M, N) in :func:`out_dtype`: fused activation quantization (per token, or with the static
    ``act_scale``/``act_zero`` from calibration, after dividing by the smoothing ``act_smooth`` (K,) in float32)
    straight from float32 or bf16, VNNI GEMV for few rows or oneDNN's int8 GEMM (``torch._int_mm``), and one fused
    epilogue for zero point, scales and bias."""
    x, divisor = activation_rows(x), _vector(act_smooth)
    (m, k), threads = x.shape, torch.get_num_threads()
    fixed_scale = 0.0 if act_scale is None else float(act_scale.reshape(()))
    fixed_zero = 0.0 if act_zero is None else float(act_zero.reshape(()))
    if m <= GEMV_ROWS_INT8:
        return _int8_small(x, weight, w_scale, row_sums, bias, 1 if symmetric else 2, fixed_scale, fixed_zero, divisor)
    q, x_scale, zero = torch.empty(m, k, dtype=torch.int8), torch.empty(m), torch.empty(m)
    _lib().lowbit_quantize_rows_int8(x.data_ptr(), q.data_ptr(), x_scale.data_ptr(), zero.data_ptr(), m, k,
                                     int(symmetric), 0, fixed_scale, fixed_zero, _ptr(divisor), is_bf16(x), threads)
    acc = int_mm(q, weight.t())
    return _epilogue(acc, None, x_scale, None if symmetric else zero, row_sums, w_scale, bias, threads, out_dtype(x))


@int8_activation_linear.register_fake
def _(x, weight, w_scale, row_sums, bias, symmetric, act_scale=None, act_zero=None, act_smooth=None):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype(x))


@custom_op("lowbit::int8_weight_linear")
def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, row_sums: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only int8 linear, (M, N) in :func:`out_dtype`: VNNI GEMV on a per-token 16-bit split of the activation
    (two int8 halves) for few rows; above, the activation rounded to bf16 and the weight decoded to bf16 (exact) inside
    the GEMM where the CPU has AVX512-BF16, else two oneDNN int8 GEMMs on the split."""
    x = activation_rows(x)
    (m, k), threads = x.shape, torch.get_num_threads()
    if m <= GEMV_ROWS_INT8:
        return _int8_small(x, weight, w_scale, row_sums, bias, 0)
    if decode_gemm.unavailable() is None:
        return decode_gemm.int8_decode_gemm(*bf16_rows(x), weight, w_scale, bias, bool(is_bf16(x)))
    halves, x_scale = torch.empty(2, m, k, dtype=torch.int8), torch.empty(m)
    _lib().lowbit_split_rows_16(x.data_ptr(), halves[0].data_ptr(), halves[1].data_ptr(), x_scale.data_ptr(), m, k, 0,
                                is_bf16(x), threads)
    w_t = weight.t()
    return _epilogue(int_mm(halves[1], w_t), int_mm(halves[0], w_t), x_scale, None, row_sums, w_scale, bias, threads,
                     out_dtype(x))


@int8_weight_linear.register_fake
def _(x, weight, w_scale, row_sums, bias):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype(x))


def _int8_args(x, tensors, bias):
    x2d = x.reshape(-1, x.shape[-1])
    w_scale = tensors["scale"].reshape(-1).float().contiguous()
    return x2d, tensors["qdata"], w_scale, colsum(tensors), None if bias is None else bias.float().contiguous()


@register_kernel("linear", "int8", "avx512", devices=("cpu",), priority=20, granularities=("per_row",),
                 requires=native.unavailable, pack=weight_colsum)
def int8_weight_avx512(x, tensors, meta, bias):
    """Weight-only int8: VNNI GEMV on a 16-bit activation split for few rows, the bf16 decode GEMM above."""
    out = int8_weight_linear(*_int8_args(x, tensors, bias))
    return finish(out, x, None, None)


def per_token_activations(call: Call) -> str | None:
    """``accepts`` of kernels that quantize activations per token in their fused pass."""
    act = call.activation
    if act is not None and act.granularity != "per_token":
        return f"it quantizes activations per token; received {act.granularity} activations"
    return None


def e4m3fn_activations(call: Call) -> str | None:
    """``accepts`` of kernels that round activations to float8_e4m3fn in their fused pass."""
    act = call.activation
    if act is not None and act.qtype != "float8_e4m3fn":
        return f"it rounds activations to float8_e4m3fn; received {act.qtype} activations"
    return None


@register_kernel("linear", "int8_dynamic", "avx512", devices=("cpu",), priority=20, granularities=("per_row",),
                 requires=native.unavailable, pack=weight_colsum, accepts=per_token_activations)
def int8_dynamic_avx512(x, tensors, meta, bias):
    """Dynamic per-token int8 with fused quantization and epilogue."""
    out = int8_activation_linear(*_int8_args(x, tensors, bias), meta["activation"].symmetric)
    return finish(out, x, None, None)


@custom_op("lowbit::float8_rows")
def float8_rows(x: torch.Tensor, act_scale: torch.Tensor | None = None, bf16: bool = False,
                act_smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 e4m3fn quantization per row (or with the static ``act_scale``, after dividing by the smoothing
    ``act_smooth`` (K,) in float32): ``(r, scale)`` with r on the e4m3 grid (float32, or bf16 where it is exact) and
    x ~= scale * r; a row holding a NaN gets scale NaN."""
    x, divisor = activation_rows(x), _vector(act_smooth)
    r, scale = torch.empty_like(x, dtype=torch.bfloat16 if bf16 else torch.float32), torch.empty(x.shape[0], 1)
    fixed = 0.0 if act_scale is None else float(act_scale.reshape(()))
    _lib().lowbit_float8_rows(x.data_ptr(), r.data_ptr(), scale.data_ptr(), x.shape[0], x.shape[1], fixed, int(bf16),
                              _ptr(divisor), is_bf16(x), torch.get_num_threads())
    return r, scale


@float8_rows.register_fake
def _(x, act_scale=None, bf16=False, act_smooth=None):
    return torch.empty_like(x, dtype=torch.bfloat16 if bf16 else torch.float32), x.new_empty(x.shape[0], 1, dtype=torch.float32)


def _float8_linear(x2d, tensors, bias, row_scale=None, bf16_out=False) -> torch.Tensor:
    """(x (* row_scale)) @ W^T * w_scale + bias, float32 (M, N), for e4m3 weights: GEMV for few rows,
    bf16 GEMM above (x in bf16 or exact in it when row_scale is given), writing bf16 with ``bf16_out``."""
    codes, fused_bias = tensors["qdata"].view(torch.uint8), None if bias is None else bias.detach()
    if x2d.shape[0] <= GEMV_ROWS_FLOAT8:  # float32 activations: the row scale goes in before the products
        return float8_gemv(x2d if row_scale is None else x2d * row_scale, codes, tensors["scale"], fused_bias)
    return fp8_decoded_linear(x2d, codes, tensors["scale"], row_scale, fused_bias, bf16_out)


def _float8_rounded_linear(x, tensors, bias, act_scale=None, act_smooth=None) -> torch.Tensor:
    """x rounded to e4m3 per token (or with the static ``act_scale`` after the smoothing division) in one pass, then
    the float8 weight kernel with the activation scale applied per row; above the GEMV rows the rounded values come
    out in bf16, the GEMM's input."""
    x2d = x.reshape(-1, x.shape[-1])
    r, row_scale = float8_rows(x2d, act_scale, x2d.shape[0] > GEMV_ROWS_FLOAT8, act_smooth)
    return finish(_float8_linear(r, tensors, bias, row_scale, x.dtype == torch.bfloat16), x)


@register_kernel("linear", "float8", "avx512", devices=("cpu",), priority=20, granularities=("per_row", "per_tensor"),
                 qtypes=("float8_e4m3fn",), requires=native.unavailable)
def float8_weight_avx512(x, tensors, meta, bias):
    """Weight-only float8 e4m3fn: GEMV for small M, exact bf16 decode + bf16 GEMM above."""
    return finish(_float8_linear(x.reshape(-1, x.shape[-1]), tensors, bias, bf16_out=x.dtype == torch.bfloat16), x)


@register_kernel("linear", "float8_dynamic", "avx512", devices=("cpu",), priority=20, granularities=("per_row", "per_tensor"),
                 qtypes=("float8_e4m3fn",), requires=native.unavailable, accepts=e4m3fn_activations)
def float8_dynamic_avx512(x, tensors, meta, bias):
    """Activations rounded to e4m3 in one fused pass, per token or with the per-tensor scale the reference
    picks, then the float8 weight kernel with the activation scale applied per row."""
    act = meta["activation"]
    scale = None if act.granularity == "per_token" else choose_qparams(x, tuple(x.shape), act.qtype, ignore_nonfinite=True)[0]
    return _float8_rounded_linear(x, tensors, bias, scale)


@register_kernel("linear", "int8_static", "avx512", devices=("cpu",), priority=20, granularities=("per_row",),
                 requires=native.unavailable, pack=weight_colsum)
def int8_static_avx512(x, tensors, meta, bias):
    """Static int8: the dynamic kernel with the calibrated per-tensor scale and zero point (smoothing divided out
    in the fused quantization pass)."""
    out = int8_activation_linear(*_int8_args(x, tensors, bias), meta["activation"].symmetric, tensors["act_scale"],
                                 tensors.get("act_zero_point"), tensors.get("act_smooth"))
    return finish(out, x, None, None)


@register_kernel("linear", "float8_static", "avx512", devices=("cpu",), priority=20, granularities=("per_row", "per_tensor"),
                 qtypes=("float8_e4m3fn",), requires=native.unavailable, accepts=e4m3fn_activations)
def float8_static_avx512(x, tensors, meta, bias):
    """Static float8: activations divided by the smoothing and rounded to e4m3 with the calibrated scale in one pass,
    then the float8 weight kernel."""
    return _float8_rounded_linear(x, tensors, bias, tensors["act_scale"], tensors.get("act_smooth"))


@custom_op("lowbit::int4_gemv")
def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
              bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Weight-only int4 for a few rows, float32 (M, N), in one C call: a 16-bit split of the activation,
    VNNI products on the canonical packed nibbles, group scales, zero points and bias."""
    x = x.contiguous().float()
    (m, k), n = x.shape, packed.shape[0]
    zero, bias = None if zero_point is None else zero_point.contiguous(), _vector(bias)
    scale, out = scale.float().contiguous(), torch.empty(m, n, dtype=torch.float32)
    _lib().lowbit_int4_linear_small(x.data_ptr(), packed.contiguous().data_ptr(), scale.data_ptr(), _ptr(zero), _ptr(bias),
                                    out.data_ptr(), m, n, k, group_size, torch.get_num_threads())
    return out


@int4_gemv.register_fake
def _(x, packed, scale, zero_point, bias, group_size):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


@register_kernel("linear", "int4", "avx512", devices=("cpu",), priority=20, granularities=("per_group",),
                 requires=native.unavailable, group_sizes=lambda group: group % 32 == 0)  # the decode takes 32 codes at a time
def int4_weight_avx512(x, tensors, meta, bias):
    """Weight-only int4: VNNI GEMV on a 16-bit activation split for few rows, bf16 decode + GEMM above."""
    group = meta["block_size"][-1]
    x2d, fused_bias = x.reshape(-1, x.shape[-1]), None if bias is None else bias.detach()
    args = (x2d, tensors["qdata"], tensors["scale"], tensors.get("zero_point"), fused_bias, group)
    if _rows(x) <= GEMV_ROWS_INT4 and x.shape[-1] % 128 == 0:  # the GEMV walks k in blocks of 128
        return finish(int4_gemv(*args), x)
    return finish(int4_decoded_linear(*args, x.dtype == torch.bfloat16), x)
