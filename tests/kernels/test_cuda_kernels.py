"""The CUDA kernels (PyTorch's ``_int_mm``, ``_scaled_mm``, ``_weight_int8pack_mm``, tinygemm) against the
reference kernel within the bound of each path's math.

Without a GPU (CI) the device-independent parts run on CPU: tinygemm's operand layout against the dequantized
weight, the registry's choice on a (pretended) GPU of each capability, and every kernel function on CPU tensors
through the ops' CPU versions. The tests marked ``needs_cuda`` quantize on the GPU and skip cleanly without one.
"""

import copy
import dataclasses
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from kernel_spy import kernels_run  # noqa: F401 (fixture)
from linear_cases import STATIC_RANGE, U, assert_within, bf16_roundings, reference_activation
from lowbit.kernels import cuda
from lowbit.kernels import registry
from lowbit.kernels.registry import Layout, select_kernel
from lowbit.primitives import choose_qparams, unpack_int4
from lowbit.tensors.from_spec import quantize_block, quantize_weight, with_static_activation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

CONFIGS = [
    lowbit.Int8WeightOnly(),
    lowbit.Int8DynamicActivation(),
    lowbit.Int8DynamicActivation(act_symmetric=True),
    lowbit.Float8DynamicActivation(),
    lowbit.Float8DynamicActivation(granularity="per_tensor"),
    lowbit.StaticInt8(),  # with smoothing divisors
    lowbit.StaticInt8(act_symmetric=True, smoothing=None),
    lowbit.StaticFloat8(),
    lowbit.Int4WeightOnly(group_size=32),
    lowbit.Int4WeightOnly(group_size=128, symmetric=True),
]
# (N, K): N not a multiple of 8 or 16 and K of 8 or 16 (both padded), aligned ones, one row, one column
SHAPES = [(44, 76), (48, 128), (1, 64), (40, 1)]
INT4_SHAPES = [(44, 256), (16, 128), (1, 256)]


def config_id(value) -> str:
    return value.label() if hasattr(value, "label") else str(value)


def shapes_of(config) -> list[tuple[int, int]]:
    if isinstance(config, lowbit.Int4WeightOnly):
        return [(n, k) for n, k in INT4_SHAPES if k % config.group_size == 0]
    return SHAPES


CASES = [(config, shape) for config in CONFIGS for shape in shapes_of(config)]


def quantized(config, weight: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``weight`` quantized as ``config`` says on its device; a static config's with the activation range
    STATIC_RANGE (and smoothing divisors in [0.5, 1.5] where the config smooths)."""
    config = dataclasses.replace(config, kernel=kernel)
    spec = config.spec()
    if not isinstance(config, lowbit.configs.STATIC_CONFIGS):
        return quantize_weight(weight, spec, kernel=kernel)
    act = spec.activation
    scale, zero = choose_qparams(torch.tensor(STATIC_RANGE), (2,), act.qtype, symmetric=act.symmetric)
    smooth = None if act.smoothing is None else torch.linspace(0.5, 1.5, weight.shape[1])
    to = lambda t: None if t is None else t.to(weight.device)  # noqa: E731
    return with_static_activation(quantize_block(weight, spec.weight, kernel=kernel), act, to(scale.reshape(())),
                                  to(None if zero is None else zero.reshape(())), to(smooth))


def cuda_kernel(scheme: str) -> registry.Kernel:
    return next(k for k in registry._KERNELS[("linear", scheme)] if k.name == "cuda")


def error_bound(q_ref, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, N): the largest |cuda kernel - reference| the math of the kernel's path allows for x (M, K).

    magnitude = sum_k |a[m, k]| |W[n, k]| + |b[n]|, a the activation the reference multiplies. Float32 dot
    products on both sides: (2K + 8) u * magnitude (int8 GEMMs are exact: only the reference's). bf16
    roundings of 2^-8 each: the float8 GEMM's result; tinygemm's activation, weight and result; with bf16
    inputs, the reference's activation, weight and result and the kernel's cast to bf16. tinygemm also
    decodes with scale and zero = (8 - zero_point) * scale rounded to bf16: 2^-8 * scale * (|u - 8| + |8 -
    zero_point|) more per weight (:func:`tinygemm_weight_error`)."""
    scheme, k = q_ref.scheme, x.shape[-1]
    weight = q_ref.dequantize(torch.float32)
    act = reference_activation(q_ref, x).reshape(-1, k).nan_to_num(0.0, 0.0, 0.0).abs().float()
    magnitude = act @ weight.abs().T + (0.0 if bias is None else bias.float().abs())
    roundings = {"float8_dynamic": 1, "float8_static": 1, "int4": 3}.get(scheme, 0) + (4 if x.dtype == torch.bfloat16 else 0)
    bound = ((2 * k + 8) * U + bf16_roundings(roundings)) * magnitude
    if scheme == "int4":
        bound = bound + (1 + bf16_roundings(roundings)) * (act @ tinygemm_weight_error(q_ref).T)
    return bound


def tinygemm_weight_error(q) -> torch.Tensor:
    """(N, K): 2^-8 * scale * (|u - 8| + |8 - zero_point|), what tinygemm's bf16 scale and zero add to a weight's
    error beyond the bf16 rounding of the weight itself (zero point 8 for symmetric weights: zero is 0)."""
    symmetric = q.zero_point is None
    group = q.block_size[-1]
    codes = unpack_int4(q.qdata, signed=symmetric).float() + (8 if symmetric else 0)
    zero_offset = 0.0 if symmetric else (8 - q.zero_point.float().repeat_interleave(group, -1)).abs()
    return 2.0**-8 * q.scale.float().repeat_interleave(group, -1) * ((codes - 8).abs() + zero_offset)


def activations(shape, dtype, device="cpu") -> torch.Tensor:
    """Random activations with a +inf, a -inf and a NaN in three different rows where there are that many."""
    x = torch.randn(shape, dtype=dtype, device=device)
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] >= 3:
        flat[0, 0], flat[1, -1], flat[2, shape[-1] // 2] = float("inf"), float("-inf"), float("nan")
    return x


def assert_matches_reference(out, expected, q_ref, x, bias, what):
    assert out.shape == expected.shape and out.dtype == expected.dtype, what
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan), f"{what}: NaN outputs differ from the reference's"
    bound = error_bound(q_ref, x, bias).reshape(out.shape)
    assert_within(out.float().masked_fill(nan, 0.0), expected.float().masked_fill(nan, 0.0), bound, what)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_int4_tinygemm_layout_reconstructs_the_dequantized_weight(symmetric):
    """Codes in the order torch._convert_weight_to_int4pack reads (code 2i in the high nibble of byte i), and
    (u - 8) * scale + zero in tinygemm's bf16 arithmetic within the bf16 roundings of scale, zero and result."""
    n, k, group = 44, 256, 64
    weight = torch.randn(n, k)
    weight[3] = 0.0  # an all-zero row
    weight[5] = weight[5].abs() + 1.0  # one-sided rows: zero points at the range's end
    weight[6] = -weight[6].abs() - 1.0
    q = quantize_weight(weight, lowbit.Int4WeightOnly(group_size=group, symmetric=symmetric).spec(), kernel="reference")
    nibbles, scales_and_zeros = cuda.int4_tinygemm_layout(*q.kernel_inputs())
    assert nibbles.dtype == torch.uint8 and tuple(nibbles.shape) == (48, k // 2)
    assert scales_and_zeros.dtype == torch.bfloat16 and tuple(scales_and_zeros.shape) == (k // group, 48, 2)
    codes = torch.stack([nibbles >> 4, nibbles & 15], -1).flatten(-2).int()  # (48, K): even k from the high nibble
    values = unpack_int4(q.qdata, signed=symmetric).int()
    assert torch.equal(codes[:n], values + 8 if symmetric else values)
    assert not codes[n:].any() and not scales_and_zeros[:, n:].float().any()  # padding rows decode to 0
    scale, zero = (scales_and_zeros[..., i].double().T.repeat_interleave(group, -1)[:n] for i in (0, 1))
    decoded = ((codes[:n] - 8) * scale + zero).to(torch.bfloat16).float()  # one rounding, as the kernel's fma
    expected = q.dequantize(torch.float32)
    bound = (1 + 2.0**-8) * tinygemm_weight_error(q) + 2.0**-8 * expected.abs()
    assert ((decoded - expected).abs() <= bound).all()
    assert torch.equal(decoded[3], torch.zeros(k))


@pytest.fixture
def cuda_argument_checks(monkeypatch):
    """The ops' CUDA argument checks (PyTorch's aten/src/ATen/native/cuda: Blas.cpp, int4mm.cu, int8mm.cu) made
    on every call of their CPU versions, so the CPU tests hold the kernels to what the GPU ops accept."""
    int_mm, scaled_mm, int8pack_mm = torch._int_mm, torch._scaled_mm, torch._weight_int8pack_mm
    int4pack_mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def checked_int_mm(a, b):
        assert a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0, f"{tuple(a.shape)} @ {tuple(b.shape)}"
        return int_mm(a, b)

    def checked_scaled_mm(a, b, *, scale_a, scale_b, out_dtype):
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, f"{tuple(a.shape)} @ {tuple(b.shape)}"
        assert a.is_contiguous() and b.t().is_contiguous()  # row-major mat1, column-major mat2
        for scale, shape in ((scale_a, (a.shape[0], 1)), (scale_b, (1, b.shape[1]))):  # row-wise scales
            assert tuple(scale.shape) == shape and scale.dtype == torch.float32 and scale.is_contiguous()
        assert out_dtype == torch.bfloat16  # the only output of row-wise scaling
        return scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)

    def checked_int8pack_mm(x, weight, scale):
        assert x.dim() == weight.dim() == 2 and tuple(scale.shape) == (weight.shape[0],)
        return int8pack_mm(x, weight, scale)

    def checked_int4pack_mm(x, packed, group, scales_and_zeros):
        assert x.dtype == scales_and_zeros.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous()
        assert group in (32, 64, 128, 256) and scales_and_zeros.shape[1] % 8 == 0 and scales_and_zeros.is_contiguous()
        return int4pack_mm(x, packed, group, scales_and_zeros)

    monkeypatch.setattr(torch, "_int_mm", checked_int_mm)
    monkeypatch.setattr(torch, "_scaled_mm", checked_scaled_mm)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", checked_int8pack_mm)
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", checked_int4pack_mm)


@pytest.mark.usefixtures("cuda_argument_checks")
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "view-without-packing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config, shape", CASES, ids=config_id)
def test_kernel_functions_on_cpu_tensors_match_reference(config, shape, dtype, packed):
    """The very function registered for CUDA, on CPU tensors through the ops' CPU versions: padding, zero-point
    correction, scales, bias, the non-finite rule and the output dtype agree with the reference kernel."""
    n, k = shape
    weight, bias = torch.randn(n, k) / k**0.5, torch.randn(n, dtype=dtype)
    q_ref = quantized(config, weight, "reference")
    tensors, meta = q_ref.kernel_inputs()
    kernel = cuda_kernel(q_ref.scheme)
    if packed and kernel.pack is not None:
        tensors = {**tensors, **kernel.pack(*q_ref.kernel_inputs())}
    for rows in [(1,), (5,), (17,), (40,), (2, 3)]:
        x = activations((*rows, k), dtype)
        assert_matches_reference(kernel.fn(x, tensors, meta, bias), F.linear(x, q_ref, bias), q_ref, x, bias, f"rows={rows}")


@pytest.mark.parametrize("config, shape, padded", [
    (lowbit.Int8DynamicActivation(), (48, 128), None), (lowbit.Int8DynamicActivation(), (44, 76), (48, 80)),
    (lowbit.Float8DynamicActivation(), (48, 128), None), (lowbit.Float8DynamicActivation(), (40, 72), (48, 80)),
], ids=config_id)
def test_a_padded_copy_of_the_weight_is_packed_only_where_its_shape_needs_one(config, shape, padded):
    q = quantized(config, torch.randn(shape), "reference")
    layout = cuda_kernel(q.scheme).pack(*q.kernel_inputs())
    if padded is None:
        assert "packed" not in layout  # the kernel reads the canonical weight
        return
    codes, weight = layout["packed"].view(torch.uint8), q.weight.qdata.view(torch.uint8)
    assert tuple(codes.shape) == padded and torch.equal(codes[: shape[0], : shape[1]], weight)
    assert not codes[shape[0]:].any() and not codes[:, shape[1]:].any()  # zeros: +0.0 in e4m3fn


@pytest.fixture
def gpu(monkeypatch):
    """A pretended GPU: ``gpu(capability)`` makes the CUDA kernels' checks see it (and a build with their ops)."""
    monkeypatch.setattr(registry, "_CHOSEN", {})  # selections are cached without the capability

    def pretend(capability):
        monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        registry._CHOSEN.clear()

    return pretend


# the compute capability each scheme's op needs: _int_mm (8, 0), _scaled_mm row-wise (8, 9),
# _weight_int8pack_mm (7, 0), tinygemm (8, 0); and the GPU generation before it
NEEDED = {"int8": (7, 0), "int8_dynamic": (8, 0), "int8_static": (8, 0), "float8_dynamic": (8, 9),
          "float8_static": (8, 9), "int4": (8, 0)}
OLDER = {(7, 0): (6, 1), (8, 0): (7, 5), (8, 9): (8, 6)}


@pytest.mark.parametrize("config, shape", CASES, ids=config_id)
def test_auto_picks_the_cuda_kernel_on_a_gpu_that_runs_it(config, shape, gpu):
    meta = quantized(config, torch.randn(shape), "reference").kernel_inputs()[1]
    scheme = config.scheme
    gpu(NEEDED[scheme])
    assert select_kernel("linear", scheme, "cuda", "auto", meta).name == "cuda"
    assert select_kernel("linear", scheme, "cpu", "auto", meta).name != "cuda"
    with pytest.raises(RuntimeError, match=r"runs on \['cuda'\], not cpu"):
        select_kernel("linear", scheme, "cpu", "cuda", meta)
    gpu(OLDER[NEEDED[scheme]])
    assert select_kernel("linear", scheme, "cuda", "auto", meta).name == "reference"
    with pytest.raises(RuntimeError, match=re.escape(f"compute capability {NEEDED[scheme]} or newer; this one has")):
        select_kernel("linear", scheme, "cuda", "cuda", meta)


def test_requirements_name_what_is_missing(monkeypatch):
    requires = cuda.needs("_int_mm", (8, 0))
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    assert requires("cuda") == "needs a PyTorch build with a CUDA kernel for aten::_int_mm"
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in requires("cuda")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "NVIDIA" in requires("cuda")


def test_tinygemm_takes_its_group_sizes_only():
    kernel = cuda_kernel("int4")
    assert "does not take groups of 16" in kernel.missing("cuda", Layout(frozenset({"per_group"}), "uint4", 16))
    assert all(kernel.group_sizes(group) for group in lowbit.configs.INT4_GROUP_SIZES)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config, shape", CASES, ids=config_id)
def test_quantized_on_cuda_matches_reference_and_runs_the_cuda_kernel(config, shape, dtype, kernels_run):
    reason = cuda_kernel(config.scheme).requires("cuda")
    if reason is not None:
        pytest.skip(reason)
    n, k = shape
    weight, bias = (torch.randn(n, k) / k**0.5).cuda(), torch.randn(n, dtype=dtype, device="cuda")
    q, q_ref = quantized(config, weight), quantized(config, weight, "reference")
    for rows in [(1,), (16,), (17,), (40,), (2, 3)]:  # both sides of _int_mm's 16-row limit
        x = activations((*rows, k), dtype, "cuda")
        kernels_run.clear()
        out = F.linear(x, q, bias)
        assert kernels_run == [("linear", "cuda")]
        assert_matches_reference(out, F.linear(x, q_ref, bias), q_ref, x, bias, f"rows={rows}")


@needs_cuda
@pytest.mark.parametrize("config", [c for c in CONFIGS if not isinstance(c, lowbit.configs.STATIC_CONFIGS)], ids=config_id)
def test_a_model_quantized_on_cpu_and_moved_to_cuda_runs_as_one_quantized_there(config, kernels_run):
    reason = cuda_kernel(config.scheme).requires("cuda")
    if reason is not None:
        pytest.skip(reason)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    on_gpu = lowbit.quantize_(copy.deepcopy(model).cuda(), config)
    moved = lowbit.quantize_(model, config).cuda()
    x = torch.randn(24, 256, device="cuda")
    kernels_run.clear()
    out = moved(x)
    assert kernels_run == [("linear", "cuda")] * 2
    assert torch.equal(out, on_gpu(x))  # the same codes and scales, the same kernel
