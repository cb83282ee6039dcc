"""Fast CPU kernels agree with the reference kernel on every path (small/large M, tails, layouts)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lowbit
from conftest import ALL_CONFIGS, assert_compiles_and_exports, config_id
from linear_cases import FAST_CASES, assert_within, case_id, error_bound, quantized, reference_of
from lowbit.kernels import avx512, native, onednn_linear
from lowbit.primitives import choose_qparams, quantize
from lowbit.primitives.packing import unpack_int4
from lowbit.kernels.registry import select_kernel
from lowbit.tensors import DynamicActivationTensor

needs_native = pytest.mark.skipif(native.unavailable() is not None, reason=f"native kernels: {native.unavailable()}")

CASES = [  # the kernel "auto" picks, with its bound by the math of each path (linear_cases.error_bound)
    (lowbit.Int8WeightOnly(), "avx512"),  # above the GEMV rows: 16-bit activation split
    (lowbit.Int8DynamicActivation(), "avx512"),  # small weights (large ones: onednn, test_onednn_linear)
    (lowbit.Int8DynamicActivation(act_symmetric=True), "avx512"),
    (lowbit.Float8WeightOnly(), "avx512"),  # few rows: float32 GEMV on exact e4m3 decodes
    (lowbit.Float8DynamicActivation(), "avx512"),
    (lowbit.Float8DynamicActivation(granularity="per_tensor"), "avx512"),
    (lowbit.Int4WeightOnly(group_size=32), "avx512"),
    (lowbit.Int4WeightOnly(group_size=64, symmetric=True), "avx512"),
]


def _reference(q):
    if isinstance(q, DynamicActivationTensor):
        return DynamicActivationTensor.wrap(q.weight.canonical().rebuild(kernel="reference"), q.activation)
    return q.canonical().rebuild(kernel="reference")


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [(96, 160), (48, 192)]  # K = 160: not a multiple of 64 (GEMV tails)
CASE_SHAPES = [(*case, shape) for case in CASES for shape in SHAPES if shape[1] % (getattr(case[0], "group_size", None) or 1) == 0]


@needs_native
@pytest.mark.parametrize("config, kernel, shape", CASE_SHAPES, ids=lambda v: v.label() if hasattr(v, "label") else str(v))
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 17, 40])
def test_fast_kernel_matches_reference(config, kernel, rows, shape):
    weight = torch.randn(*shape) / shape[1] ** 0.5
    weight[0, :4] = torch.tensor([3e-6, -2e-7, 0.0, 1e-4])  # float8 subnormals after scaling
    q = quantized(config, weight)
    kernel_fn = select_kernel("linear", q.scheme, "cpu", "auto", q.kernel_inputs()[1])
    assert kernel_fn.name == kernel
    x = torch.randn(rows, shape[1])
    bias = torch.randn(shape[0])
    ref = _reference(q)
    fast, expected = F.linear(x, q, bias), F.linear(x, ref, bias)
    assert fast.shape == expected.shape and fast.dtype == expected.dtype
    assert_within(fast, expected, error_bound(dataclasses.replace(config, kernel=kernel), ref, x, bias), f"rows={rows}")


@needs_native
@pytest.mark.parametrize("config", [c for c in FAST_CASES if c.scheme in ("int8", "int8_dynamic")], ids=case_id)
@pytest.mark.parametrize("offset", [-6.0, 6.0], ids=["negative", "positive"])
def test_int8_kernels_match_reference_with_large_zero_points(config, offset, monkeypatch):
    """One-sided activations give asymmetric zero points near 127 or -128: the zero-point correction
    (acc - zero * weight row sums) dominates, so any error in it (a flipped sign) leaves the bound."""
    weight, bias = torch.randn(40, 96) / 96**0.5 + 0.05, torch.randn(40)  # rows with nonzero sums
    fast, ref = quantized(config, weight), reference_of(config, weight)
    for rows in (1, 5, 9, 33):  # every kernel's few-row and GEMM paths
        x = torch.randn(rows, 96) * 0.5 + offset
        _, zero = choose_qparams(x, (1, 96), "int8", symmetric=False)
        assert zero.int().abs().min() >= 120
        expected = F.linear(x, ref, bias)
        assert_within(F.linear(x, fast, bias), expected, error_bound(config, ref, x, bias), f"rows={rows}")


@needs_native
@pytest.mark.parametrize("group_size, symmetric", [(32, False), (64, True), (128, False), (256, True), (256, False)])
def test_int4_gemv_every_group_size_matches_reference(group_size, symmetric):
    """The GEMV maps groups of 32 and 64 to lanes of a 128-k block and accumulates larger groups
    across blocks; rows 1..8 take it (with the bias fused), 9 the decoded GEMM."""
    config = lowbit.Int4WeightOnly(group_size=group_size, symmetric=symmetric)
    weight = torch.randn(37, 768)  # 37 rows: not a multiple of any tile
    weight[3] = 0.0  # an all-zero row: its groups have the smallest scale
    q = quantized(config, weight)
    bias = torch.randn(37)
    for rows in (1, 2, 5, avx512.GEMV_ROWS_INT4, avx512.GEMV_ROWS_INT4 + 1):
        x = torch.randn(rows, 768) * torch.linspace(0.01, 10, 768)
        tolerance = 1e-4 if rows <= avx512.GEMV_ROWS_INT4 else 5e-3  # the GEMM runs on bf16 activations
        assert _relative(F.linear(x, q, bias), F.linear(x, _reference(q), bias)) < tolerance


@needs_native
@pytest.mark.parametrize("table_decode", [True, False], ids=["table-decode", "register-decode"])
def test_float8_gemv_decodes_every_code_exactly(monkeypatch, table_decode):
    """Every finite e4m3 code (subnormals, both zeros, +-448) in a weight matrix with a K tail; rows 1..12
    (above 8 the kernel takes the rows in passes). Both decodes: byte tables (AVX512-VBMI) and registers."""
    if table_decode and not native.has_table_decode():
        pytest.skip("this CPU has no AVX512-VBMI")
    monkeypatch.setattr(native, "has_table_decode", lambda: table_decode)
    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    codes = finite[torch.randperm(len(finite)).repeat(15)[: 19 * 200]].reshape(19, 200)  # K = 200: 3 blocks of 64 + 8
    values = codes.view(torch.float8_e4m3fn).double()
    scale, bias = torch.rand(19) + 0.5, torch.randn(19)
    for rows in (1, 2, 3, 4, 5, 8, 12):
        x = torch.randn(rows, 200)
        expected = x.double() @ (values * scale.double()[:, None]).T + bias.double()
        got = avx512.float8_gemv(x, codes, scale, bias)
        assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


@needs_native
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_bf16_decode_is_bit_exact(group_size, symmetric):
    """The table decode equals (q - zero) * scale rounded to bf16, for every group size, signed and unsigned
    codes, and a K that ends half-way through a 64-code step (K = 96 * 7 when the group allows it)."""
    k = 96 * 7 if 672 % group_size == 0 else 768
    q = quantized(lowbit.Int4WeightOnly(group_size=group_size, symmetric=symmetric), torch.randn(5, k))
    packed, scale = q.qdata.contiguous(), q.scale.float().contiguous()
    zero = None if symmetric else q.zero_point.contiguous()
    codes = unpack_int4(packed, signed=symmetric).float()
    groups = lambda t: t.float().repeat_interleave(group_size, dim=-1)  # noqa: E731
    expected = ((codes - (0 if zero is None else groups(zero))) * groups(scale)).to(torch.bfloat16)
    out = torch.empty(5, k, dtype=torch.bfloat16)
    native.library().lowbit_int4_rows_to_bf16(packed.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                                              out.data_ptr(), k, group_size, 0, 5, 2)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@needs_native
@pytest.mark.parametrize("config", [lowbit.Int8WeightOnly(), lowbit.Int8DynamicActivation(),
                                    lowbit.Int8DynamicActivation(act_symmetric=True)], ids=lambda c: c.label())
def test_int8_amx_tiles_equal_the_vnni_gemv(monkeypatch, config):
    """37 weight rows: two 16-row AMX tiles and five rows left to the VNNI loop; K a multiple of 64."""
    if not native.amx_ready():
        pytest.skip("no AMX tiles here")
    q = quantized(config, torch.randn(37, 256))
    bias = torch.randn(37)
    for rows in range(1, avx512.GEMV_ROWS_INT8 + 1):
        x = torch.randn(rows, 256) * torch.linspace(0.1, 4, 256)
        tiles = F.linear(x, q, bias)
        monkeypatch.setattr(native, "amx_ready", lambda: False)
        vnni = F.linear(x, q, bias)
        monkeypatch.undo()
        assert torch.equal(tiles, vnni)


@needs_native
def test_native_ops_compile_and_export():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    lowbit.quantize_(model, lowbit.Float8WeightOnly())
    assert_compiles_and_exports(model, torch.randn(2, 64), "lowbit.float8_gemv")


PER_ROW_FLOAT8 = {"shape": (8, 64), "block_size": (1, 64), "qtype": "float8_e4m3fn"}


def test_unavailable_native_library_is_reported(monkeypatch):
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "reason", "needs CPU features ['avx512f']")
    lowbit.kernels.registry._CHOSEN.clear()
    try:
        with pytest.raises(RuntimeError, match="cannot run here: needs CPU features"):
            select_kernel("linear", "float8", "cpu", "avx512", PER_ROW_FLOAT8)
        assert select_kernel("linear", "float8", "cpu", "auto", PER_ROW_FLOAT8).name == "reference"
    finally:
        lowbit.kernels.registry._CHOSEN.clear()


def test_gemv_thresholds_are_small():
    assert all(1 <= rows <= 16 for rows in (avx512.GEMV_ROWS_INT8, avx512.GEMV_ROWS_FLOAT8, avx512.GEMV_ROWS_INT4))


def _hard_rows():
    x = torch.randn(7, 100) * torch.logspace(-6, 3, 100)  # float8 subnormals to saturation
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), float("nan"), float("-inf")
    x[3] = 0.0  # an all-zero row
    return x


def _nan_rows_scale(scale, x):
    """The native row quantizers' scale: the primitives' one, NaN for the rows of x holding a NaN."""
    return torch.where(torch.isnan(x).any(-1, keepdim=True), float("nan"), scale.reshape(-1, 1))


@needs_native
def test_fused_float8_activation_quantization_is_bit_exact():
    x = _hard_rows()
    r, scale = avx512.float8_rows(x)
    expected_scale, _ = choose_qparams(x, (1, 100), "float8_e4m3fn", ignore_nonfinite=True)
    codes = quantize(x, expected_scale, None, (1, 100), "float8_e4m3fn", saturate_nonfinite=True)
    assert torch.equal(r, codes.float())
    assert torch.allclose(scale, _nan_rows_scale(expected_scale, x), rtol=0, atol=0, equal_nan=True)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_int8_activation_quantization_is_bit_exact(symmetric, dtype):
    """Straight from float32 or bf16 rows (a bf16 model's activations): the primitives' result on the same values."""
    rows = _hard_rows().to(dtype)
    x = rows.float()
    q, scale, zero = (torch.empty(7, 100, dtype=torch.int8), torch.empty(7), torch.empty(7))
    native.library().lowbit_quantize_rows_int8(rows.data_ptr(), q.data_ptr(), scale.data_ptr(), zero.data_ptr(), 7, 100,
                                               int(symmetric), 0, 0.0, 0.0, None, int(dtype == torch.bfloat16), 1)
    expected_scale, expected_zero = choose_qparams(x, (1, 100), "int8", symmetric=symmetric, ignore_nonfinite=True)
    expected = quantize(x, expected_scale, expected_zero, (1, 100), "int8", saturate_nonfinite=True)
    assert torch.equal(q, expected)
    assert torch.allclose(scale, _nan_rows_scale(expected_scale, x).reshape(-1), rtol=0, atol=0, equal_nan=True)
    if not symmetric:
        assert torch.equal(zero, expected_zero.float().reshape(-1))


@needs_native
def test_plain_eager_calls_skip_the_dispatcher_and_tracing_sees_the_op():
    """Plain eager calls run the implementation directly (no op in the profiler's dispatcher events);
    under a dispatch mode (as when tracing) the call goes through the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    lowbit.quantize_(model, lowbit.Int8WeightOnly())
    x = torch.randn(2, 64)
    expected = model(x)
    with torch.profiler.profile() as prof:
        model(x)
    assert not any("lowbit::" in event.name for event in prof.events())
    with SeenOps() as seen:
        traced = model(x)
    assert "lowbit.int8_weight_linear.default" in seen.names
    assert torch.equal(traced, expected)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_sliced_weight_with_strided_inner_tensors_equals_its_contiguous_copy(config):
    layer = lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(128, 32)), config)[0]
    part = layer.weight[:, :64]  # a view: qdata rows keep the stride of 128 input features
    inner = part.weight if isinstance(part, DynamicActivationTensor) else part
    assert not inner.qdata.is_contiguous()
    copy = part.with_weight(inner.map_tensors(torch.Tensor.contiguous)) if inner is not part else part.map_tensors(torch.Tensor.contiguous)
    for rows in (3, 16):  # the few-row C kernels and the GEMM paths
        x = torch.randn(rows, 64)
        assert torch.equal(F.linear(x, part), F.linear(x, copy))
