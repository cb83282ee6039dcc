"""Autograd at one boundary: forward in grad mode runs only the kernel; backward uses the dequantized weight."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ALL_CONFIGS, MLP, config_id

import lowbit
from lowbit.kernels import boundary


@pytest.fixture
def weight_builds(monkeypatch):
    """Counts how often the float weight for a gradient is built."""
    calls = []
    real = boundary.effective_weight

    def counting(*args, **kwargs):
        calls.append(args[1].get("block_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(boundary, "effective_weight", counting)
    return calls


@pytest.mark.parametrize("module_swap", [False, True])
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_grad_mode_forward_equals_no_grad_and_builds_no_float_weight(config, module_swap, weight_builds):
    model = lowbit.quantize_(MLP(), config, module_swap=module_swap)
    assert model.fc1.bias.requires_grad  # the default after quantize_: autograd records every call
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = model(x)
    out = model(x)
    assert out.requires_grad and torch.equal(out.detach(), expected)
    assert weight_builds == []  # forward paid for no dequantized weight
    out.sum().backward()
    assert len(weight_builds) == 2  # one per layer, in backward


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=config_id)
def test_gradients_are_those_of_the_float_op_on_the_dequantized_weight(config):
    model = lowbit.quantize_(MLP(), config)
    x = torch.randn(2, 3, 64, requires_grad=True)
    grad_out = torch.randn(2, 3, 128)
    model.fc1(x).backward(grad_out)
    w = model.fc1.weight.dequantize()
    torch.testing.assert_close(x.grad, grad_out @ w)
    torch.testing.assert_close(model.fc1.bias.grad, grad_out.sum((0, 1)))


def test_smoothed_static_layer_gradient_folds_the_smoothing_out():
    model = MLP()
    lowbit.prepare(model, lowbit.StaticInt8(smoothing=0.5))
    lowbit.calibrate(model, [torch.randn(16, 64) * torch.linspace(0.1, 8, 64) for _ in range(2)], progress=False)
    lowbit.convert(model)
    smooth = model.fc1.weight.act_smooth
    assert smooth is not None and not torch.allclose(smooth, torch.ones_like(smooth))
    x = torch.randn(4, 64, requires_grad=True)
    model.fc1(x).sum().backward()
    expected = model.fc1.weight.weight.dequantize(torch.float32) / smooth  # y = (x / s) W'^T
    torch.testing.assert_close(x.grad, expected.sum(0).expand(4, 64))


def test_conv_gradients_follow_the_dequantized_weight():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    lowbit.quantize_(conv_model := nn.Sequential(conv), lowbit.Int8WeightOnly(), filter_fn=lambda m, n: isinstance(m, nn.Conv2d))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    conv_model(x).square().sum().backward()
    xr = x.detach().requires_grad_()
    bias = conv.bias.detach().requires_grad_()
    F.conv2d(xr, conv.weight.dequantize(), bias, padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(conv.bias.grad, bias.grad)


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    model = lowbit.quantize_(MLP(), lowbit.Int8DynamicActivation())
    compiled = copy.deepcopy(model)
    x = torch.randn(8, 64, requires_grad=True)
    model(x).square().sum().backward()
    xc = x.detach().requires_grad_()
    torch.compile(compiled, fullgraph=True)(xc).square().sum().backward()
    torch.testing.assert_close(xc.grad, x.grad)
    torch.testing.assert_close(compiled.fc2.bias.grad, model.fc2.bias.grad)
