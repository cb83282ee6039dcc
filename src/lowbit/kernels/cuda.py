"""CUDA kernels on PyTorch's own GPU ops, registered as kernel ``"cuda"`` for CUDA devices.

* int8 dynamic / static: ``torch._int_mm`` (cuBLASLt int8 GEMM, exact int32 sums), then one float32
  epilogue for the activation zero point (with the weight's row sums), both scales and the bias;
* float8 dynamic / static (e4m3fn): ``torch._scaled_mm`` with row-wise scales (float32 accumulation;
  the op returns bfloat16 for row-wise scales), the bias added in float32;
* int8 weight-only: ``torch._weight_int8pack_mm`` (float32 dot products of the activation and the
  int8 codes, times the row scale);
* int4 weight-only: ``torch._weight_int4pack_mm`` (tinygemm: bf16 activations, codes decoded in the
  kernel as bf16 ``(u - 8) * scale + zero``, bf16 result), on a tiled layout packed at quantize/load time.

Each kernel checks that this PyTorch build has the op's CUDA kernel and that the GPU's compute capability
is one the op runs on. Activations are quantized with the reference's primitives (same scales, zero
points and codes as ``kernel="reference"``). Shapes an op cannot take are padded with zeros, which add
nothing to the sums: ``_int_mm`` needs more than 16 rows and K, N multiples of 8, ``_scaled_mm`` K and N
multiples of 16, tinygemm N a multiple of 16. Activation rows and columns are padded per call; a weight
whose N or K needs it gets a padded copy once, at pack time (the canonical one stays for files and views).

The kernel functions also take CPU tensors where PyTorch has the op on CPU (``_int_mm``, ``_scaled_mm``,
``_weight_int8pack_mm``; tinygemm's CPU twin ``_weight_int4pack_mm_for_cpu``, whose packing takes the codes
as int32), so the tests run the same math on CPU against the reference kernel; they are registered for CUDA
only. Non-finite activations follow the rule of every kernel (:mod:`lowbit.kernels.reference`): weight-only
kernels saturate +-inf first and NaN reaches its row through the products; kernels that quantize activations
give a row holding a NaN a NaN scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..primitives.affine import choose_qparams, quantize
from ..primitives.fake_quantize import unpacked_values
from .avx512 import e4m3fn_activations
from .cpu import colsum, finish, weight_colsum
from .reference import nan_rows, saturate_inf
from .registry import Call, register_kernel

INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA takes more than 16 rows
INT_MM_MULTIPLE = 8  # ... and K, N multiples of 8
SCALED_MM_MULTIPLE = 16  # torch._scaled_mm takes K, N multiples of 16
TINYGEMM_ROWS_MULTIPLE = 16  # N of tinygemm's tiles (8 on CUDA, 16 for its CPU twin)
TINYGEMM_GROUPS = (32, 64, 128, 256)


def needs(op: str, capability: tuple[int, int]):
    """``requires`` of a kernel built on ``torch.<op>``: an NVIDIA GPU of compute capability ``capability`` or
    newer and a PyTorch build with the op's CUDA kernel."""

    def requires(device_type: str) -> str | None:
        if torch.version.hip is not None:
            return "runs on NVIDIA GPUs (PyTorch's ROCm build is untested with it)"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA"):
            return f"needs a PyTorch build with a CUDA kernel for aten::{op}"
        if not torch.cuda.is_available():
            return "needs a CUDA GPU; torch.cuda.is_available() is False"
        found = torch.cuda.get_device_capability()
        if found < capability:
            return f"torch.{op} needs a GPU of compute capability {capability} or newer; this one has {found}"
        return None

    return requires


def int8_activations(call: Call) -> str | None:
    """``accepts`` of kernels that multiply int8 activation codes."""
    act = call.activation
    if act is not None and act.qtype != "int8":
        return f"it multiplies int8 activations; received {act.qtype} activations"
    return None


def quantize_activation(x2d: torch.Tensor, act, scale: torch.Tensor | None = None,
                        zero_point: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A (M, K) activation quantized as ``act`` says, per token or per tensor (dynamic), or with the calibrated
    per-tensor ``scale`` and ``zero_point`` (static): ``(codes (M, K), scale (M, 1) float32, zero point float32
    or None)``, the scale NaN for rows holding a NaN; the codes are those of the reference's fake quantization."""
    block = (1, x2d.shape[1]) if scale is None and act.granularity == "per_token" else tuple(x2d.shape)
    if scale is None:
        scale, zero_point = choose_qparams(x2d, block, act.qtype, symmetric=act.symmetric, ignore_nonfinite=True)
    else:
        scale, zero_point = scale.reshape(1, 1), None if zero_point is None else zero_point.reshape(1, 1)
    codes = quantize(x2d, scale, zero_point, block, act.qtype, saturate_nonfinite=True)
    scale = torch.where(nan_rows(x2d), float("nan"), scale.float())  # (M, 1)
    return codes, scale, None if zero_point is None else zero_point.float()


def aligned(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """A (N, K) weight zero-padded to multiples of ``multiple`` along both dims, contiguous (``t`` itself when
    it is both already).

    Example:
        >>> aligned(torch.ones(3, 5, dtype=torch.int8), 4).tolist()
        [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
    """
    pad_rows, pad_cols = -t.shape[0] % multiple, -t.shape[1] % multiple
    if not (pad_rows or pad_cols):
        return t.contiguous()
    if t.dtype.is_floating_point and t.element_size() == 1:  # float8, padded as bytes: 0x00 is +0.0
        return F.pad(t.view(torch.uint8), (0, pad_cols, 0, pad_rows)).view(t.dtype)
    return F.pad(t, (0, pad_cols, 0, pad_rows))


def _pad_columns(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Activation codes (M, K) zero-padded to ``k`` columns (1-byte codes padded as bytes: 0x00 is 0 in each)."""
    pad = k - codes.shape[1]
    if not pad:
        return codes
    return F.pad(codes.view(torch.uint8), (0, pad)).view(codes.dtype)


def _weight(tensors: dict, multiple: int) -> torch.Tensor:
    """The padded copy packed for the kernel, else the canonical weight (aligned already, or padded here for a
    view that dropped the packed copy)."""
    packed = tensors.get("packed")
    return packed if packed is not None else aligned(tensors["qdata"], multiple)


def _pack_padded(tensors: dict, multiple: int) -> dict:
    """A padded copy of the weight, only when its shape needs one."""
    weight = tensors["qdata"]
    return {"packed": aligned(weight, multiple)} if weight.shape[0] % multiple or weight.shape[1] % multiple else {}


def int_mm(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Exact int32 products ``codes (M, K) @ weight (N', K')^T``, (M, N'), for an aligned int8 weight: the
    codes' columns padded to K', and their rows to more than 16 with zeros (the extra rows are dropped).

    Example:
        >>> int_mm(torch.ones(1, 5, dtype=torch.int8), aligned(torch.full((3, 5), 2, dtype=torch.int8), 8)).tolist()
        [[10, 10, 10, 0, 0, 0, 0, 0]]
    """
    m = codes.shape[0]
    codes = _pad_columns(codes, weight.shape[1])
    if m < INT_MM_MIN_ROWS:
        codes = F.pad(codes, (0, 0, 0, INT_MM_MIN_ROWS - m))
    return torch._int_mm(codes, weight.t())[:m]


def _pack_int8(tensors: dict, meta: dict) -> dict:
    return {**weight_colsum(tensors, meta), **_pack_padded(tensors, INT_MM_MULTIPLE)}


def _int8_linear(x, tensors, meta, bias, scale=None, zero_point=None):
    """y = ((q_x - z_x) @ q_w^T) * s_x * s_w + bias, with q_x @ q_w^T exact in int32 and z_x * (row sums of q_w)
    taken off in float32."""
    x2d = x.reshape(-1, x.shape[-1])
    codes, x_scale, x_zero = quantize_activation(x2d, meta["activation"], scale, zero_point)
    acc = int_mm(codes, _weight(tensors, INT_MM_MULTIPLE))[:, : meta["shape"][0]].float()  # (M, N)
    if x_zero is not None:
        acc = acc - x_zero * colsum(tensors)
    return finish(acc * x_scale, x, tensors["scale"], bias)


def _smoothed(x, tensors):
    smooth = tensors.get("act_smooth")
    return x if smooth is None else x / smooth.to(x.dtype)


_INT8 = dict(devices=("cuda",), priority=20, granularities=("per_row",), requires=needs("_int_mm", (8, 0)), pack=_pack_int8,
             accepts=int8_activations)


@register_kernel("linear", "int8_dynamic", "cuda", **_INT8)
def int8_dynamic_cuda(x, tensors, meta, bias):
    """Dynamic int8 activations (per token or per tensor) times per-row int8 weights on ``torch._int_mm``."""
    return _int8_linear(x, tensors, meta, bias)


@register_kernel("linear", "int8_static", "cuda", **_INT8)
def int8_static_cuda(x, tensors, meta, bias):
    """Static int8: the calibrated per-tensor scale and zero point (after the smoothing divisors), ``torch._int_mm``."""
    return _int8_linear(_smoothed(x, tensors), tensors, meta, bias, tensors["act_scale"], tensors.get("act_zero_point"))


def _scale_row(tensors: dict, n: int, columns: int) -> torch.Tensor:
    """The weight's scales as the contiguous float32 row (1, columns) ``_scaled_mm`` takes: per row, or the
    per-tensor scale repeated; the padding columns get 1."""
    row = tensors["scale"].reshape(1, -1).float().expand(1, n)
    return F.pad(row, (0, columns - n), value=1.0).contiguous()


def _pack_float8(tensors: dict, meta: dict) -> dict:
    padded = _pack_padded(tensors, SCALED_MM_MULTIPLE)
    columns = padded.get("packed", tensors["qdata"]).shape[0]
    return {**padded, "packed_aux": _scale_row(tensors, meta["shape"][0], columns)}


def _float8_linear(x, tensors, meta, bias, scale=None):
    """Activations rounded to e4m3fn with the reference's scales, then ``torch._scaled_mm`` with row-wise scales
    (float32 accumulation, bf16 result), the bias added in float32."""
    x2d, n = x.reshape(-1, x.shape[-1]), meta["shape"][0]
    codes, x_scale, _ = quantize_activation(x2d, meta["activation"], scale)
    weight = _weight(tensors, SCALED_MM_MULTIPLE)  # (N', K') e4m3fn
    w_scale = tensors.get("packed_aux")
    if w_scale is None:
        w_scale = _scale_row(tensors, n, weight.shape[0])
    out = torch._scaled_mm(_pad_columns(codes, weight.shape[1]), weight.t(), scale_a=x_scale, scale_b=w_scale,
                           out_dtype=torch.bfloat16)
    return finish(out[:, :n], x, None, bias)


_FLOAT8 = dict(devices=("cuda",), priority=20, granularities=("per_row", "per_tensor"), qtypes=("float8_e4m3fn",),
               requires=needs("_scaled_mm", (8, 9)), pack=_pack_float8, accepts=e4m3fn_activations)


@register_kernel("linear", "float8_dynamic", "cuda", **_FLOAT8)
def float8_dynamic_cuda(x, tensors, meta, bias):
    """Dynamic e4m3fn activations (per token or per tensor) on ``torch._scaled_mm`` with row-wise scales."""
    return _float8_linear(x, tensors, meta, bias)


@register_kernel("linear", "float8_static", "cuda", **_FLOAT8)
def float8_static_cuda(x, tensors, meta, bias):
    """Static float8: the calibrated per-tensor scale (after the smoothing divisors), ``torch._scaled_mm``."""
    return _float8_linear(_smoothed(x, tensors), tensors, meta, bias, tensors["act_scale"])


@register_kernel("linear", "int8", "cuda", devices=("cuda",), priority=20, granularities=("per_row",),
                 requires=needs("_weight_int8pack_mm", (7, 0)))
def int8_weight_cuda(x, tensors, meta, bias):
    """Weight-only int8 on ``torch._weight_int8pack_mm``: float32 activations (+-inf saturated), float32 products."""
    x2d = saturate_inf(x.reshape(-1, x.shape[-1])).float().contiguous()
    out = torch._weight_int8pack_mm(x2d, tensors["qdata"].contiguous(), tensors["scale"].reshape(-1).float())
    return finish(out, x, None, bias)


def int4_tinygemm_layout(tensors: dict, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A canonical int4 weight as tinygemm's operands, on its device.

    Returns ``(nibbles, scales_and_zeros)``: nibbles (N', K/2) uint8 hold codes u in [0, 15], code 2i in the high
    nibble of byte i (the order ``torch._convert_weight_to_int4pack`` reads); scales_and_zeros (K/G, N', 2)
    bf16 hold per group the scale and the float offset ``zero = (8 - zero_point) * scale`` (0 for symmetric
    weights), so that ``(u - 8) * scale + zero`` is the weight ``(u - zero_point) * scale``, both rounded to
    bf16. N' is N rounded up to a multiple of 16; the added rows are zeros (code 0, scale 0, zero 0).
    """
    values = unpacked_values(tensors, meta)  # (N, K): int8 in [-8, 7], or uint8 in [0, 15] with a zero point
    zero_point = tensors.get("zero_point")
    codes = (values.to(torch.int16) + 8 if zero_point is None else values).to(torch.uint8)
    nibbles = codes[:, 0::2] << 4 | codes[:, 1::2]  # (N, K/2)
    scale = tensors["scale"].float()  # (N, K/G)
    zero = torch.zeros_like(scale) if zero_point is None else (8 - zero_point.float()) * scale
    pad = -codes.shape[0] % TINYGEMM_ROWS_MULTIPLE
    scales_and_zeros = F.pad(torch.stack([scale, zero], -1), (0, 0, 0, 0, 0, pad))  # (N', K/G, 2)
    return F.pad(nibbles, (0, 0, 0, pad)), scales_and_zeros.transpose(0, 1).to(torch.bfloat16).contiguous()


def int4pack(nibbles: torch.Tensor) -> torch.Tensor:
    """tinygemm's tiled weight from :func:`int4_tinygemm_layout`'s nibbles: ``torch._convert_weight_to_int4pack``
    on CUDA, its CPU twin (which takes the codes as int32) on CPU."""
    k = 2 * nibbles.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)  # K is a multiple of the group, >= 32
    if nibbles.is_cuda:
        return torch._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles)
    codes = torch.stack([nibbles >> 4, nibbles & 15], -1).flatten(-2)  # (N', K)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), inner_k_tiles)


def _pack_int4(tensors: dict, meta: dict) -> dict:
    nibbles, scales_and_zeros = int4_tinygemm_layout(tensors, meta)
    return {"packed": int4pack(nibbles), "packed_aux": scales_and_zeros}


@register_kernel("linear", "int4", "cuda", devices=("cuda",), priority=20, granularities=("per_group",),
                 requires=needs("_weight_int4pack_mm", (8, 0)), pack=_pack_int4,
                 group_sizes=lambda group: group in TINYGEMM_GROUPS)
def int4_weight_cuda(x, tensors, meta, bias):
    """Weight-only int4 on tinygemm (``torch._weight_int4pack_mm``): bf16 activations (+-inf saturated),
    bf16 weights decoded in the kernel, bf16 result."""
    packed = tensors.get("packed")
    layout = _pack_int4(tensors, meta) if packed is None else tensors  # a view that dropped the packed fields
    x2d = saturate_inf(x.reshape(-1, x.shape[-1])).to(torch.bfloat16).contiguous()
    mm = torch._weight_int4pack_mm if x2d.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    out = mm(x2d, layout["packed"], meta["block_size"][-1], layout["packed_aux"])
    return finish(out[:, : meta["shape"][0]], x, None, bias)
