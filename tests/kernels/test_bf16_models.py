"""int8-mixed-bf16: a quantized model cast to bf16 takes and returns bf16 with no float32 round trip of its
activations. The fast kernels read bf16 rows exactly and round their float32 result once, half to even, so a
bf16 call returns exactly the float32 call on the same (widened) input, rounded to bf16."""

import copy

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.kernels import native

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"native kernels: {native.unavailable()}")

CONFIGS = [lowbit.Int8WeightOnly(), lowbit.Int8DynamicActivation(), lowbit.Int8DynamicActivation(act_symmetric=True),
           lowbit.Int4WeightOnly(group_size=32), lowbit.IntxWeightOnly(bits=3), lowbit.Float8WeightOnly(),
           lowbit.Float8DynamicActivation(), lowbit.StaticInt8(), lowbit.StaticFloat8()]


def _quantized(config, linear):
    model = nn.Sequential(copy.deepcopy(linear))
    if isinstance(config, lowbit.configs.STATIC_CONFIGS):
        lowbit.prepare(model, config)
        lowbit.calibrate(model, [torch.randn(16, 256) for _ in range(2)], progress=False)
        return lowbit.convert(model)
    return lowbit.quantize_(model, config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_bf16_model_returns_the_float32_result_rounded_once(config):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    with torch.no_grad():
        linear.bias.copy_(linear.bias.to(torch.bfloat16))  # the bf16 model's bias, exactly
    torch.manual_seed(1)
    model32 = _quantized(config, linear)
    torch.manual_seed(1)
    model16 = _quantized(config, linear).to(torch.bfloat16)
    for rows in (1, 3, 9, 40):  # GEMV rows and GEMM rows of every kernel
        x = (torch.randn(rows, 256) * 2).to(torch.bfloat16)
        with torch.inference_mode():
            out = model16(x)
            expected = model32(x.float()).to(torch.bfloat16)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, expected), f"rows={rows}"
