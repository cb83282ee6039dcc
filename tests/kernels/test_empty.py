"""Inputs without elements (an empty batch, an empty sequence, an empty index tensor) give the empty
result PyTorch's float layer gives, in shape and dtype, for every config, kernel and layer; no kernel
(and no native entry point) is handed zero rows."""

import copy
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.kernels import native
from lowbit.tensors.base import QuantizedTensor
from lowbit.tensors.float8 import Float8Tensor
from lowbit.tensors.int8 import Int8Tensor
from linear_cases import CASES, case_id

LINEAR_INPUTS = [(0, 128), (2, 0, 128), (0, 3, 128)]
CONVS = [
    (lambda: nn.Conv1d(4, 8, 3), (0, 4, 9)),
    (lambda: nn.Conv2d(4, 8, 3, padding=1), (0, 4, 8, 8)),
    (lambda: nn.Conv3d(4, 8, 3), (0, 4, 5, 5, 5)),
    (lambda: nn.ConvTranspose2d(4, 8, 3, stride=2), (0, 4, 5, 5)),
]
CONV_CONFIGS = [lowbit.Int8WeightOnly(), lowbit.Float8WeightOnly(), lowbit.StaticInt8(), lowbit.StaticFloat8()]
ANY_LAYER = lambda module, fqn: isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))  # noqa: E731


def _quantize(model: nn.Module, config, calibration_shape, module_swap=False) -> nn.Module:
    if isinstance(config, lowbit.configs.STATIC_CONFIGS):
        lowbit.prepare(model, config, filter_fn=ANY_LAYER)
        lowbit.calibrate(model, [torch.randn(calibration_shape)], progress=False)
        return lowbit.convert(model, module_swap=module_swap)
    return lowbit.quantize_(model, config, filter_fn=ANY_LAYER, module_swap=module_swap)


def _assert_like_float(quantized: nn.Module, float_model: nn.Module, x: torch.Tensor):
    expected = float_model(x)
    out = quantized(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.device == expected.device


@pytest.mark.parametrize("module_swap", [False, True], ids=["subclass", "module-swap"])
@pytest.mark.parametrize("config", CASES, ids=case_id)
def test_empty_linear_input_gives_an_empty_result(config, module_swap):
    float_model = nn.Sequential(nn.Linear(128, 32)).eval()
    model = _quantize(copy.deepcopy(float_model), config, (4, 128), module_swap)
    half, float_half = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(float_model).to(torch.bfloat16)
    for shape in LINEAR_INPUTS:
        _assert_like_float(model, float_model, torch.randn(shape))
        _assert_like_float(half, float_half, torch.randn(shape, dtype=torch.bfloat16))


@pytest.mark.parametrize("config", CASES, ids=case_id)
def test_empty_input_in_grad_mode_has_an_empty_gradient(config):
    model = _quantize(nn.Sequential(nn.Linear(128, 32)), config, (4, 128))
    x = torch.randn(2, 0, 128, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(model[0].bias.grad, torch.zeros(32))


@pytest.mark.parametrize("make, shape", CONVS, ids=lambda v: type(v()).__name__ if callable(v) else str(v))
@pytest.mark.parametrize("kernel", ["auto", "reference"])
@pytest.mark.parametrize("config", CONV_CONFIGS, ids=case_id)
def test_empty_conv_input_gives_an_empty_result(config, kernel, make, shape):
    float_model = nn.Sequential(make()).eval()
    calibration = (2, *shape[1:])
    model = _quantize(copy.deepcopy(float_model), dataclasses.replace(config, kernel=kernel), calibration)
    assert isinstance(model[0].weight, QuantizedTensor)
    _assert_like_float(model, float_model, torch.randn(shape))


@pytest.mark.parametrize("config", [lowbit.Int8WeightOnly(), lowbit.Int4WeightOnly(group_size=32), lowbit.Float8WeightOnly()],
                         ids=case_id)
def test_empty_index_tensor_gives_an_empty_embedding(config):
    float_model = nn.Sequential(nn.Embedding(10, 64))
    model = lowbit.quantize_(copy.deepcopy(float_model), config, filter_fn=ANY_LAYER)
    for shape in [(0,), (3, 0)]:
        _assert_like_float(model, float_model, torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("make", [lambda w: Int8Tensor.from_float(w, (1, 1, 16)), lambda w: Float8Tensor.from_float(w, (1, 1, 16))],
                         ids=["int8", "float8"])
def test_empty_bmm_gives_an_empty_result(make):
    weight = torch.randn(3, 64, 16)
    q = make(weight)
    for shape in [(3, 0, 64), (0, 5, 64)]:
        x = torch.randn(shape)
        if shape[0] != weight.shape[0]:  # PyTorch's own shape error
            with pytest.raises(RuntimeError):
                torch.bmm(x, weight)
            with pytest.raises(RuntimeError):
                torch.bmm(x, q)
            continue
        assert torch.bmm(x, q).shape == torch.bmm(x, weight).shape == (3, 0, 16)


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: a crash (SIGSEGV) fails the test instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_empty_batch_does_not_crash_the_interpreter():
    """The reported crash: K % 64 == 0 and N >= 16 took AMX tiles configured for zero activation rows."""
    result = _run("""
        import torch, torch.nn as nn, lowbit
        for config in (lowbit.Int8WeightOnly(), lowbit.Int8DynamicActivation(), lowbit.Int8DynamicActivation(act_symmetric=True)):
            for swap in (False, True):
                m = lowbit.quantize_(nn.Sequential(nn.Linear(128, 32)), config, module_swap=swap)
                print(tuple(m(torch.randn(0, 128)).shape))
        m = lowbit.prepare(nn.Sequential(nn.Linear(128, 32)), lowbit.StaticInt8())
        lowbit.calibrate(m, [torch.randn(4, 128)], progress=False)
        print(tuple(lowbit.convert(m)(torch.randn(0, 128)).shape))
    """)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split("\n")[:7] == ["(0, 32)"] * 7


@pytest.mark.skipif(native.unavailable() is not None, reason=f"native kernels: {native.unavailable()}")
def test_native_entry_points_return_at_once_for_zero_rows():
    """Called with M = 0 (and asked for AMX tiles) the fused kernels touch nothing."""
    result = _run("""
        import torch
        from lowbit.kernels import native
        lib = native.library()
        x, w, out = torch.zeros(1, 128), torch.zeros(32, 128, dtype=torch.int8), torch.zeros(1, 32)
        vec = torch.ones(32)
        for mode in (0, 1, 2):
            lib.lowbit_int8_linear_small(x.data_ptr(), w.data_ptr(), vec.data_ptr(), vec.data_ptr(), None, out.data_ptr(),
                                         0, 32, 128, mode, 0.0, 0.0, 1, 2)
        packed, scales = torch.zeros(32, 64, dtype=torch.uint8), torch.ones(32, 4)
        lib.lowbit_int4_linear_small(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), None, None, out.data_ptr(), 0, 32, 128, 32, 2)
        lib.lowbit_fp8_gemv_table(x.data_ptr(), packed.data_ptr(), vec.data_ptr(), None, out.data_ptr(), 0, 32, 128, 2)
        lib.lowbit_fp8_gemv(x.data_ptr(), packed.data_ptr(), vec.data_ptr(), None, out.data_ptr(), 0, 32, 128, 2)
        print("ok", bool((out == 0).all()))
    """)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip() == "ok True"
