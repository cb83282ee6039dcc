"""Int8 linears on oneDNN's prepacked u8s8 GEMM (``torch.ops.onednn.qlinear_pointwise``): what
``kernel="auto"`` picks for dynamic and static int8 activations, and ``kernel="onednn"`` for weight-only int8.

At quantize/load time the int8 weight is reordered into oneDNN's blocked layout (``qlinear_prepack``) and
the canonical (N, K) copy is dropped, so a model holds each weight once (plus one float per output row).
Calls skip the per-call weight reorder ``torch._int_mm`` pays, and oneDNN picks its AMX/VNNI GEMM for every
batch size. Files, views, gradients and other kernels get the canonical values back from the packed layout
(``to_dense``, exact; ~20 ms for a 4096x11008 weight).

Each call quantizes activations per token in one pass, straight from float32 or bf16, as uint8 q + 128 (the
16-bit split for weight-only int8: both halves as rows of one GEMM); oneDNN returns the exact integer products
as float32 (input scale 1, zero point 128, unit weight scales), and one fused pass applies the zero point
correction, both scales and the bias, writing float32 or bf16 (bf16 activations get bf16 results). Non-finite
activations follow the rule of every kernel (:mod:`lowbit.kernels.reference`), through the same activation
quantization and epilogue.
"""

from __future__ import annotations

import functools

import torch

from . import native
from .avx512 import _epilogue, _int8_args, _ptr, _vector, activation_rows, int8_activation_linear, int8_weight_linear, is_bf16
from .avx512 import out_dtype
from .avx512 import per_token_activations
from .cpu import colsum, finish, needs_vnni, weight_colsum
from .ops import custom_op
from .registry import register_kernel


def _requires(device_type: str) -> str | None:
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "needs torch.ops.onednn.qlinear_pointwise (PyTorch built with oneDNN)"
    return needs_vnni(device_type) or native.unavailable(device_type)


def _pack(tensors, meta) -> dict:
    """oneDNN's layout of the (N, K) int8 weight and its row sums; the canonical copy is dropped."""
    weight = tensors["qdata"]
    packed = torch.ops.onednn.qlinear_prepack(weight, [1, weight.shape[1]])  # layout independent of the batch
    return {"packed": packed, **weight_colsum(tensors, meta), "qdata": None}


@custom_op("lowbit::onednn_unpack")
def onednn_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The canonical (N, K) int8 weight, read back exactly from oneDNN's layout (which densifies to (K, N)); an op
    of its own so compiled graphs (a compiled backward) leave the opaque tensor to it."""
    return packed.to_dense().t().contiguous()


@onednn_unpack.register_fake
def _(packed):
    return packed.new_empty(packed.shape[1], packed.shape[0], dtype=torch.int8)


def _unpack(tensors, meta) -> dict:
    return {"qdata": onednn_unpack(tensors["packed"])}


@functools.cache
def _unit(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight scales of 1 and zero points of 0: oneDNN returns the raw integer products."""
    with torch.inference_mode(False):
        return torch.ones(n), torch.zeros(n, dtype=torch.int64)


def _products(q: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """sum_k (q[m, k] - 128) * w[n, k] as float32 (M, N), for uint8 q."""
    ones, zeros = _unit(n)
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], "")


@custom_op("lowbit::int8_onednn_linear")
def int8_onednn_linear(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, row_sums: torch.Tensor,
                       bias: torch.Tensor | None, mode: int, act_scale: torch.Tensor | None = None,
                       act_zero: torch.Tensor | None = None, act_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """int8 linear, (M, N) in :func:`.avx512.out_dtype`, on a prepacked weight. ``mode``: 0 weight-only (16-bit
    activation split), 1 / 2 int8 activations per token (symmetric / asymmetric), or with the static ``act_scale``
    (after dividing by the smoothing ``act_smooth``)."""
    x, divisor = activation_rows(x), _vector(act_smooth)
    (m, k), n, threads, lib = x.shape, row_sums.shape[0], torch.get_num_threads(), native.library()
    x_scale, dtype = torch.empty(m), out_dtype(x)
    if mode == 0:
        halves = torch.empty(2 * m, k, dtype=torch.uint8)  # hi rows, then lo rows
        lib.lowbit_split_rows_16(x.data_ptr(), halves[:m].data_ptr(), halves[m:].data_ptr(), x_scale.data_ptr(), m, k, 1,
                                 is_bf16(x), threads)
        acc = _products(halves, packed, n)
        return _epilogue(acc[m:], acc[:m], x_scale, None, row_sums, w_scale, bias, threads, dtype)
    q, zero = torch.empty(m, k, dtype=torch.uint8), torch.empty(m)
    fixed_scale = 0.0 if act_scale is None else float(act_scale.reshape(()))
    fixed_zero = 0.0 if act_zero is None else float(act_zero.reshape(()))
    lib.lowbit_quantize_rows_int8(x.data_ptr(), q.data_ptr(), x_scale.data_ptr(), zero.data_ptr(), m, k, int(mode == 1), 1,
                                  fixed_scale, fixed_zero, _ptr(divisor), is_bf16(x), threads)
    return _epilogue(_products(q, packed, n), None, x_scale, None if mode == 1 else zero, row_sums, w_scale, bias, threads,
                     dtype)


@int8_onednn_linear.register_fake
def _(x, packed, w_scale, row_sums, bias, mode, act_scale=None, act_zero=None, act_smooth=None):
    return x.new_empty(x.shape[0], row_sums.shape[0], dtype=out_dtype(x))


def _linear(x, tensors, bias, mode: int, act_scale=None, act_zero=None, act_smooth=None):
    if tensors.get("packed") is None:  # a canonical view (e.g. a weight applied in the orientation it was not packed for)
        x2d, weight, w_scale, row_sums, bias32 = _int8_args(x, tensors, bias)
        out = (int8_weight_linear(x2d, weight, w_scale, row_sums, bias32) if mode == 0 else
               int8_activation_linear(x2d, weight, w_scale, row_sums, bias32, mode == 1, act_scale, act_zero, act_smooth))
    else:
        w_scale, bias32 = tensors["scale"].reshape(-1).float().contiguous(), None if bias is None else bias.float().contiguous()
        out = int8_onednn_linear(x.reshape(-1, x.shape[-1]), tensors["packed"], w_scale, colsum(tensors), bias32, mode,
                                 act_scale, act_zero, act_smooth)
    return finish(out, x)


# Above the avx512 kernels for int8 activations on weights of AUTO_MIN_WEIGHTS elements or more: measured 1.3-4.5x
# faster there at 4-256 rows (bf16 activations, Zen 4), 0.7-0.8x at one row; on smaller weights (MiniLM's 384x1536)
# the avx512 kernels are faster at every row count. Weight-only int8 keeps its canonical weight for the one-call
# GEMV that decoding single tokens needs.
AUTO_MIN_WEIGHTS = 1 << 22
_REGISTER = dict(devices=("cpu",), granularities=("per_row",), requires=_requires, pack=_pack, unpack=_unpack)


@register_kernel("linear", "int8", "onednn", priority=15, **_REGISTER)
def int8_weight_onednn(x, tensors, meta, bias):
    """Weight-only int8 on a 16-bit activation split, prepacked oneDNN GEMM."""
    return _linear(x, tensors, bias, 0)


@register_kernel("linear", "int8_dynamic", "onednn", priority=25, auto_min_weights=AUTO_MIN_WEIGHTS, **_REGISTER,
                 accepts=per_token_activations)
def int8_dynamic_onednn(x, tensors, meta, bias):
    """Dynamic per-token int8, prepacked oneDNN GEMM."""
    return _linear(x, tensors, bias, 1 if meta["activation"].symmetric else 2)


@register_kernel("linear", "int8_static", "onednn", priority=25, auto_min_weights=AUTO_MIN_WEIGHTS, **_REGISTER)
def int8_static_onednn(x, tensors, meta, bias):
    """Static int8 (calibrated per-tensor scale and zero point, smoothing divided out in the quantization pass),
    prepacked oneDNN GEMM."""
    mode = 1 if meta["activation"].symmetric else 2
    return _linear(x, tensors, bias, mode, tensors["act_scale"], tensors.get("act_zero_point"), tensors.get("act_smooth"))
