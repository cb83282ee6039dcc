"""Linear weights for every config x registered kernel, and the error each kernel may have against
``kernel="reference"`` by the math of its path (shared by the shape, non-finite and kernel tests).

Error bound per output (m, n), with u = 2^-24 (float32) and magnitude = sum_k |a[m, k]| |W[n, k]| + |b[n]|,
a the activation the reference multiplies (inf saturated, quantized for dynamic/static configs):

* integer products are exact int32: only float rounding, the reference's dot product (K roundings) and a few
  in the epilogues: (K + 8) u * magnitude;
* float32 dot products on both sides (float8 GEMV, int4 GEMV): (2K + 8) u * magnitude (the int4 GEMV's
  zero-point correction cancels: its magnitude counts the codes and zero points, not their difference);
* 16-bit activation split (weight-only int8 GEMV and int_mm16, int4 GEMV): |x - scale * r| <= (0.5 + 2^-8) scale
  per element, scale = max|x[m]| / 32639: that times sum_k |W[n, k]| more;
* bf16 GEMMs: 2^-8 relative per bf16 rounding (8 significant bits) of activations, weights and the GEMM's
  result, compounded.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lowbit
from lowbit.kernels import avx512, decode_gemm
from lowbit.kernels.reference import fake_quantize_activation, fake_quantize_static, saturate_inf
from lowbit.kernels.registry import kernel_names
from lowbit.primitives import choose_qparams
from lowbit.primitives.packing import unpack_int4
from lowbit.tensors.from_spec import quantize_block, quantize_weight, with_static_activation

U = 2.0**-24


def bf16_roundings(count: int) -> float:
    """Relative error of ``count`` successive bf16 roundings (unit roundoff 2^-8)."""
    return (1 + 2.0**-8) ** count - 1


STATIC_RANGE = (-2.5, 3.0)  # the calibrated activation range of static weights: values beyond it saturate

CONFIGS = [
    lowbit.Int8WeightOnly(),
    lowbit.Int8DynamicActivation(),
    lowbit.Int8DynamicActivation(act_symmetric=True),
    lowbit.Int4WeightOnly(group_size=32),
    lowbit.Int4WeightOnly(group_size=32, symmetric=True),
    lowbit.Float8WeightOnly(),
    lowbit.Float8DynamicActivation(),
    lowbit.Float8DynamicActivation(granularity="per_tensor"),
    lowbit.StaticInt8(smoothing=None),
    lowbit.StaticInt8(act_symmetric=True, smoothing=None),
    lowbit.StaticFloat8(),
]
CASES = [dataclasses.replace(config, kernel=name) for config in CONFIGS for name in kernel_names("linear", config.scheme, "cpu")]
FAST_CASES = [case for case in CASES if case.kernel != "reference"]


def case_id(config) -> str:
    return config.label()


def quantized(config, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized as ``config`` says, a static config's with the activation range STATIC_RANGE;
    skips the test where the config's kernel cannot run on this machine."""
    try:
        spec = config.spec()
        if not isinstance(config, lowbit.configs.STATIC_CONFIGS):
            return quantize_weight(weight, spec, kernel=config.kernel)
        act = spec.activation
        scale, zero = choose_qparams(torch.tensor(STATIC_RANGE), (2,), act.qtype, symmetric=act.symmetric)
        inner = quantize_block(weight, spec.weight, kernel=config.kernel)
        return with_static_activation(inner, act, scale.reshape(()), None if zero is None else zero.reshape(()))
    except RuntimeError as error:
        if "cannot run here" in str(error):
            pytest.skip(str(error))
        raise


def reference_of(config, weight: torch.Tensor) -> torch.Tensor:
    return quantized(dataclasses.replace(config, kernel="reference"), weight)


def reference_activation(q_ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The activation the reference kernel multiplies by the dequantized weight."""
    tensors, meta = q_ref.kernel_inputs()
    act = meta.get("activation")
    if act is None:
        return saturate_inf(x)
    if "act_scale" in tensors:
        return fake_quantize_static(x, act, tensors["act_scale"], tensors.get("act_zero_point"))
    return fake_quantize_activation(x, act)


def error_bound(config, q_ref: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, N): the largest |kernel - reference| the math of ``config.kernel``'s path allows for x (M, K)."""
    (m, k), scheme = x.shape, config.scheme
    weight = q_ref.dequantize(torch.float32)
    bias_abs = 0.0 if bias is None else bias.abs()
    act = reference_activation(q_ref, x).nan_to_num(0.0, 0.0, 0.0).abs()
    magnitude = act @ weight.abs().T + bias_abs
    split16 = 0.0  # weight-only 16-bit activation split
    if scheme.startswith("int8"):
        if scheme == "int8" and config.kernel == "avx512" and m > avx512.GEMV_ROWS_INT8 and decode_gemm.unavailable() is None:
            return (bf16_roundings(1) + (2 * k + 8) * U) * magnitude  # activations in bf16, exact weights, float32 sums
        if scheme == "int8":
            split16 = 1.0
        return split16 * _split_error(x, weight) + (k + 8) * U * magnitude
    if scheme == "int4":
        if m <= avx512.GEMV_ROWS_INT4 and k % 128 == 0:  # GEMV: 16-bit split, float32 group sums
            codes_and_zeros = _int4_code_magnitude(q_ref)
            return _split_error(x, weight) + (2 * k + 8) * U * (act @ codes_and_zeros.T + bias_abs)
        return (bf16_roundings(3) + (2 * k + 8) * U) * magnitude  # activations, weights and result in bf16
    if m <= avx512.GEMV_ROWS_FLOAT8:  # float8: float32 GEMV on the reference's own activations
        return (2 * k + 8) * U * magnitude
    roundings = 1 if scheme in ("float8_static", "float8_dynamic") and _per_row_or_static(q_ref) else 2
    return (bf16_roundings(roundings) + (2 * k + 8) * U) * magnitude  # result (and float activations) in bf16


def _per_row_or_static(q_ref) -> bool:
    """Whether the float8 kernel rounds activations to e4m3 itself (exact in bf16) rather than taking float ones."""
    act = q_ref.kernel_inputs()[1]["activation"]
    return act.granularity == "per_token" or "act_scale" in q_ref.kernel_inputs()[0]


def _split_error(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, N): sum_k |W[n, k]| times the 16-bit split's largest activation error in row m."""
    step = saturate_inf(x).nan_to_num(0.0).abs().amax(-1, keepdim=True) / 32639  # (M, 1)
    return (0.5 + 2.0**-8) * step * weight.abs().sum(-1)


def _int4_code_magnitude(q_ref) -> torch.Tensor:
    """(N, K): scale * (code + zero point) with the codes as the GEMV multiplies them (unsigned, signed + 8)."""
    signed = q_ref.zero_point is None
    codes = unpack_int4(q_ref.qdata, signed=signed).float() + (8 if signed else 0)
    group = q_ref.block_size[-1]
    zero = 8.0 if signed else q_ref.zero_point.float().repeat_interleave(group, -1)
    return (codes + zero) * q_ref.scale.float().repeat_interleave(group, -1)


def assert_within(fast: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    excess = (fast - ref).abs() - bound
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"{what}: |kernel - reference| exceeds the bound at {tuple(torch.unravel_index(worst, excess.shape))}: "
        f"{(fast - ref).abs().flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g}"
    )
