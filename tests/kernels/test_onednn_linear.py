"""The opt-in oneDNN int8 linear: the same integer math as the avx512 kernels, on a weight packed once."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from conftest import assert_compiles_and_exports, assert_survives_copies
from lowbit.kernels import onednn_linear
from lowbit.kernels.registry import select_kernel
from lowbit.tensors.from_spec import quantize_weight

pytestmark = pytest.mark.skipif(onednn_linear._requires("cpu") is not None,
                                reason=f"onednn linear kernel: {onednn_linear._requires('cpu')}")

CONFIGS = [
    lambda kernel: lowbit.Int8WeightOnly(kernel=kernel),
    lambda kernel: lowbit.Int8DynamicActivation(kernel=kernel),
    lambda kernel: lowbit.Int8DynamicActivation(act_symmetric=True, kernel=kernel),
]


def _quantize(config, weight):
    return quantize_weight(weight, config.spec(), kernel=config.kernel)


@pytest.mark.parametrize("make", CONFIGS, ids=lambda make: make("onednn").label())
def test_onednn_linear_equals_the_avx512_kernel(make):
    weight, bias = torch.randn(96, 160) / 160**0.5, torch.randn(96)
    fast, lean = _quantize(make("onednn"), weight), _quantize(make("avx512"), weight)
    inner = getattr(fast, "weight", fast)
    assert inner.packed.layout == torch._mkldnn and inner.packed_for is not None
    # the same integer math as avx512's one-call GEMV for few rows and its int8 GEMM above (weight-only avx512
    # takes a bf16 GEMM above the GEMV's rows instead of the 16-bit split)
    weight_only = isinstance(fast, lowbit.tensors.Int8Tensor)
    for rows in (1, 2, 3) if weight_only else (1, 2, 3, 9, 40):
        x = torch.randn(rows, 160) * torch.linspace(0.1, 4, 160)
        torch.testing.assert_close(F.linear(x, fast, bias), F.linear(x, lean, bias), rtol=2**-22, atol=1e-6)
    x = torch.randn(2, 2, 160)
    torch.testing.assert_close(F.linear(x, fast, bias), F.linear(x, lean, bias), rtol=2**-22, atol=1e-6)


def test_auto_packs_large_int8_activation_weights_for_onednn_and_drops_the_canonical_copy():
    large = {"shape": (2048, 2048), "block_size": (1, 2048), "qtype": "int8"}  # AUTO_MIN_WEIGHTS elements
    small = {"shape": (2048, 2047), "block_size": (1, 2047), "qtype": "int8"}
    assert select_kernel("linear", "int8_dynamic", "cpu", "auto", large).name == "onednn"
    assert select_kernel("linear", "int8_static", "cpu", "auto", large).name == "onednn"
    assert select_kernel("linear", "int8_dynamic", "cpu", "auto", small).name == "avx512"  # faster on small weights
    assert select_kernel("linear", "int8", "cpu", "auto", large).name == "avx512"  # keeps its one-call GEMV
    weight = torch.randn(48, 64)
    packed = _quantize(lowbit.Int8DynamicActivation(kernel="onednn"), weight).weight
    lean = _quantize(lowbit.Int8DynamicActivation(kernel="avx512"), weight).weight
    assert packed.qdata is None and packed.packed_for == ("int8_dynamic", "onednn")  # one copy of the weight
    assert packed.storage_bytes() <= lean.storage_bytes()
    canonical = packed.canonical()  # files and views: the exact int8 values, read back from oneDNN's layout
    assert torch.equal(canonical.qdata, lean.qdata) and canonical.packed is None
    assert torch.equal(packed.dequantize(), lean.dequantize())
    assert torch.equal(packed.t().dequantize(), lean.dequantize().t())


@pytest.mark.parametrize("kernel", ["onednn", "avx512"])
@pytest.mark.parametrize("make", [lambda k: lowbit.Int8DynamicActivation(kernel=k), lambda k: lowbit.Int8WeightOnly(kernel=k)],
                         ids=["dynamic", "weight-only"])
def test_bf16_activations_give_bf16_results_rounded_from_the_float32_path(make, kernel):
    """A bf16 model's activations go in and come out as bf16 without float32 copies: the values are the same
    (bf16 widens exactly), so the bf16 result is the float32 result rounded once, half to even."""
    linear = nn.Linear(160, 96)
    model = lowbit.quantize_(copy.deepcopy(linear), make(kernel))
    model_bf16 = lowbit.quantize_(copy.deepcopy(linear), make(kernel)).to(torch.bfloat16)
    for rows in (1, 9, 40):
        x = (torch.randn(rows, 160) * 3).to(torch.bfloat16)
        out = model_bf16(x)
        assert out.dtype == torch.bfloat16
        expected = F.linear(x.float(), model.weight, model_bf16.bias.float()).to(torch.bfloat16)
        torch.testing.assert_close(out, expected, rtol=2**-8, atol=0)


def test_static_int8_on_onednn_equals_avx512():
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    calibration = [torch.randn(8, 64) for _ in range(4)]
    models = []
    for kernel in ("onednn", "avx512"):
        quantized = lowbit.prepare(copy.deepcopy(model), lowbit.StaticInt8(kernel=kernel))
        lowbit.calibrate(quantized, calibration, progress=False)
        models.append(lowbit.convert(quantized))
    x = torch.randn(11, 64) * 1.5
    with torch.inference_mode():
        torch.testing.assert_close(models[0](x), models[1](x), rtol=2**-22, atol=1e-6)


def test_packed_linear_survives_deepcopy_pickle_state_dict_and_bf16():
    torch.manual_seed(0)
    model = lowbit.quantize_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)),
                             lowbit.Int8DynamicActivation(kernel="onednn"))
    assert_survives_copies(model, torch.randn(6, 64))


def test_onednn_linear_compiles_and_exports():
    model = lowbit.quantize_(nn.Sequential(nn.Linear(64, 32)), lowbit.Int8WeightOnly(kernel="onednn"))
    assert_compiles_and_exports(model, torch.randn(12, 64), "int8_onednn_linear")  # above the one-call kernel's rows


def test_module_swap_holding_the_packed_weight_survives_copies():
    """QuantizedLinear's buffers hold oneDNN's opaque weight (no storage): pickles and deep copies carry the canonical
    weight and pack it again."""
    torch.manual_seed(0)
    model = lowbit.quantize_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)),
                             lowbit.Int8DynamicActivation(kernel="onednn"), module_swap=True)
    assert model[0].packed.layout == torch._mkldnn and not hasattr(model[0], "qdata")
    assert_survives_copies(model, torch.randn(6, 64))
    assert copy.deepcopy(model)[0].packed.layout == torch._mkldnn


def test_module_swap_cast_to_bf16_keeps_the_row_sums_exact():
    """``model.to(torch.bfloat16)`` casts a module swap's float buffers; the weight row sums behind the zero-point
    correction stay exact int32 (here ~41000, which bf16 would round by up to 128) and the kernels read them as such."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 32)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 512) * 0.01 + 0.05)  # int8 rows near +90: large row sums
    config = lowbit.Int8DynamicActivation(kernel="onednn")
    subclass = lowbit.quantize_(nn.Sequential(copy.deepcopy(linear)), config).to(torch.bfloat16)
    swapped = lowbit.quantize_(nn.Sequential(copy.deepcopy(linear)), config, module_swap=True).to(torch.bfloat16)
    assert swapped[0].packed_aux.dtype == torch.int32
    x = (torch.rand(8, 512) + 0.5).to(torch.bfloat16)  # one-sided: zero points at the end of the range
    expected = subclass(x).float()
    error = (swapped(x).float() - expected).norm() / expected.norm()
    assert error < 2**-7  # the swap's weight scales rounded to bf16 (2^-9) and its bf16 output
