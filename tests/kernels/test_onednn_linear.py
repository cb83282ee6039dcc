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


@pytest.fixture
def pack_small(monkeypatch):
    """Pack the small test weights too (real models pack only weights of 2^20 elements or more)."""
    monkeypatch.setattr(onednn_linear, "PACK_MIN_WEIGHTS", 0)


@pytest.mark.parametrize("make", CONFIGS, ids=lambda make: make("onednn").label())
def test_onednn_linear_equals_the_avx512_kernel(make, pack_small):
    weight, bias = torch.randn(96, 160) / 160**0.5, torch.randn(96)
    fast, lean = _quantize(make("onednn"), weight), _quantize(make("auto"), weight)
    inner = getattr(fast, "weight", fast)
    assert inner.packed.layout == torch._mkldnn and inner.packed_for is not None
    for rows in (1, 2, 3, 9, 40):  # lowbit's one-call kernel for few rows, oneDNN's GEMM above
        x = torch.randn(rows, 160) * torch.linspace(0.1, 4, 160)
        torch.testing.assert_close(F.linear(x, fast, bias), F.linear(x, lean, bias), rtol=0, atol=0)
    x = torch.randn(2, 5, 160)
    torch.testing.assert_close(F.linear(x, fast, bias), F.linear(x, lean, bias), rtol=0, atol=0)


def test_auto_keeps_the_lean_kernel_and_small_weights_stay_unpacked():
    per_row = {"shape": (32, 64), "block_size": (1, 64), "qtype": "int8"}
    assert select_kernel("linear", "int8_dynamic", "cpu", "auto", per_row).name == "avx512"
    assert select_kernel("linear", "int8_dynamic", "cpu", "onednn", per_row).name == "onednn"
    small = _quantize(lowbit.Int8WeightOnly(kernel="onednn"), torch.randn(32, 64))
    assert small.packed is None and small.packed_aux is not None  # no second copy below PACK_MIN_WEIGHTS
    x = torch.randn(7, 64)
    torch.testing.assert_close(F.linear(x, small), F.linear(x, _quantize(lowbit.Int8WeightOnly(), small.dequantize())),
                               rtol=1e-5, atol=1e-5)


def test_static_int8_on_onednn_equals_avx512(pack_small):
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    calibration = [torch.randn(8, 64) for _ in range(4)]
    models = []
    for kernel in ("onednn", "auto"):
        quantized = lowbit.prepare(copy.deepcopy(model), lowbit.StaticInt8(kernel=kernel))
        lowbit.calibrate(quantized, calibration, progress=False)
        models.append(lowbit.convert(quantized))
    x = torch.randn(11, 64) * 1.5
    with torch.inference_mode():
        torch.testing.assert_close(models[0](x), models[1](x), rtol=0, atol=0)


def test_packed_linear_survives_deepcopy_pickle_state_dict_and_bf16(pack_small):
    torch.manual_seed(0)
    model = lowbit.quantize_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)),
                             lowbit.Int8DynamicActivation(kernel="onednn"))
    assert_survives_copies(model, torch.randn(6, 64))


def test_onednn_linear_compiles_and_exports(pack_small):
    model = lowbit.quantize_(nn.Sequential(nn.Linear(64, 32)), lowbit.Int8WeightOnly(kernel="onednn"))
    assert_compiles_and_exports(model, torch.randn(12, 64), "int8_onednn_linear")  # above the one-call kernel's rows
