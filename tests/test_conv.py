"""Convolutions: per-output-channel weights (axis 0; axis 1 per group for ConvTranspose), static inputs."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import relative_error

import lowbit

CONVS = [
    (lambda: nn.Conv1d(4, 6, 3, stride=2), (2, 4, 20)),
    (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 8, 8)),
    (lambda: nn.Conv2d(8, 8, 3, groups=8), (2, 8, 8, 8)),  # depthwise
    (lambda: nn.Conv3d(2, 4, 3), (1, 2, 6, 6, 6)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2, output_padding=1), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(3, 5, 4), (2, 3, 9)),
]
ANY_CONV = lambda m, fqn: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d))  # noqa: E731


@pytest.mark.parametrize("make, shape", CONVS)
@pytest.mark.parametrize("config", [lowbit.Int8WeightOnly(), lowbit.Float8WeightOnly()], ids=lambda c: c.label())
def test_weight_only_convolutions(make, shape, config):
    model = nn.Sequential(make()).eval()
    x = torch.randn(shape)
    expected = model(x)
    lowbit.quantize_(model, config, filter_fn=ANY_CONV)
    weight = model[0].weight
    assert isinstance(weight, lowbit.QuantizedTensor)
    channels_axis = 1 if isinstance(model[0], (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0
    out_channels = model[0].out_channels
    assert weight.scale.numel() == out_channels  # one scale per output channel
    if channels_axis == 1:
        assert weight.scale.shape[:2] == (model[0].groups, out_channels // model[0].groups)
    assert relative_error(model(x), expected) < (0.01 if isinstance(config, lowbit.Int8WeightOnly) else 0.05)


@pytest.mark.parametrize("make, shape", CONVS)
def test_static_int8_convolutions(make, shape):
    model = nn.Sequential(make()).eval()
    x = torch.randn(shape)
    expected = model(x)
    lowbit.prepare(model, lowbit.StaticInt8(), filter_fn=ANY_CONV)
    lowbit.calibrate(model, [torch.randn(shape) for _ in range(4)], progress=False)
    lowbit.convert(model)
    assert isinstance(model[0].weight, lowbit.StaticActivationTensor)
    assert relative_error(model(x), expected) < 0.05


def test_configs_that_cannot_take_convolutions_say_so():
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    for config in (lowbit.Int4WeightOnly(group_size=32), lowbit.Int8DynamicActivation(), lowbit.Int8WeightOnly(group_size=32)):
        with pytest.raises(ValueError, match="does not quantize convolutions"):
            lowbit.quantize_(copy.deepcopy(model), config, filter_fn=ANY_CONV)


def test_quantized_conv_compiles_and_exports():
    model = lowbit.quantize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), lowbit.Int8WeightOnly(), filter_fn=ANY_CONV)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))
