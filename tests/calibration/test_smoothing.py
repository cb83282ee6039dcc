"""SmoothQuant in the static flow: the factors' formula, the observer watching x / s, gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.calibration import OBSERVERS
from lowbit.algorithms.smoothquant import smoothing_factors
from lowbit.calibration.static import SMOOTHING_ATTR


def test_smoothing_factors_follow_the_formula():
    act_max = torch.tensor([8.0, 0.25, 3.0, 0.0, 5.0])
    weight_max = torch.tensor([0.5, 2.0, 1.0, 1.0, 0.0])  # channel 3: no activation, channel 4: no weight
    for alpha in (0.0, 0.5, 0.8, 1.0):
        expected = [8.0 ** alpha / 0.5 ** (1 - alpha), 0.25 ** alpha / 2.0 ** (1 - alpha), 3.0 ** alpha, 1.0, 1.0]
        torch.testing.assert_close(smoothing_factors(act_max, weight_max, alpha), torch.tensor(expected), rtol=1e-6, atol=0)


def _layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32))


def _data(seed=1, n=6, spread=2.0):
    """Heavy-tailed activations (cubed normals) with outlier channels: observers disagree on their range."""
    generator = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(64)
    channel_scale[::16] = 30.0
    return [torch.randn(16, 64, generator=generator) ** 3 * channel_scale * spread for _ in range(n)]


def _static(observer, data, **config):
    model = lowbit.prepare(_layer(), lowbit.StaticInt8(observer=observer, **config))
    lowbit.calibrate(model, data, progress=False)
    return model


def _observed(name, batches, s):
    observer = OBSERVERS[name]("int8", symmetric=False)
    for x in batches:
        observer(x / s)
    return observer.calculate_qparams()


def test_the_observer_watches_the_smoothed_activations():
    data, scales = _data(), {}
    for name in OBSERVERS:
        model = lowbit.convert(_static(name, data))
        weight = model[0].weight
        act_max = torch.stack(data).abs().amax((0, 1))
        expected_s = smoothing_factors(act_max, _layer()[0].weight.detach().abs().amax(0), 0.8)
        assert torch.equal(weight.act_smooth, expected_s)
        scale, zero_point = _observed(name, data, expected_s)  # the chosen observer run directly on x / s
        assert torch.equal(weight.act_scale, scale) and torch.equal(weight.act_zero_point, zero_point), name
        scales[name] = float(scale)
    assert len(set(scales.values())) == len(OBSERVERS), scales  # each observer counts


def test_a_later_calibrate_keeps_the_smoothing_factors():
    first, later = _data(seed=1), _data(seed=2, spread=3.0)
    model = _static("histogram", first)
    s = getattr(model[0], SMOOTHING_ATTR).clone()
    lowbit.calibrate(model, later, progress=False)
    assert torch.equal(getattr(model[0], SMOOTHING_ATTR), s)
    lowbit.convert(model)
    assert torch.equal(model[0].weight.act_scale, _observed("histogram", first + later, s)[0])


def test_one_shot_iterators_are_kept_for_the_second_pass():
    data, more = _data(), _data(seed=5)
    expected = lowbit.convert(_static("percentile", data))[0].weight.act_scale
    assert torch.equal(lowbit.convert(_static("percentile", iter(data)))[0].weight.act_scale, expected)
    model = lowbit.prepare(_layer(), lowbit.StaticInt8(observer="percentile"))
    assert lowbit.calibrate(model, iter(data + more), max_batches=len(data), progress=False) == len(data)
    assert torch.equal(lowbit.convert(model)[0].weight.act_scale, expected)


def test_smoothed_layers_observe_only_inside_calibrate():
    model = lowbit.prepare(_layer(), lowbit.StaticInt8())
    for x in _data():
        model(x)
    with pytest.raises(lowbit.NotCalibratedError, match="smoothing"):
        lowbit.convert(model)


@pytest.mark.parametrize("smoothing", [0.8, None])
def test_input_gradient_is_the_dequantized_weights(smoothing):
    """Straight-through: d(x W^T)/dx uses the weight the layer stands for, smoothing folded back out."""
    model = lowbit.convert(_static("minmax", _data(), smoothing=smoothing))
    layer = model[0]
    if smoothing is not None:
        assert (layer.weight.act_smooth - 1).abs().max() > 1  # factors far from 1: a missing 1 / s shows
    x = torch.randn(8, 64, requires_grad=True)
    grad_out = torch.randn(8, 32)
    layer(x).backward(grad_out)
    reference = x.detach().clone().requires_grad_()
    weight = layer.weight.dequantize()
    # ... which is the float weight within half an int8 step of its row of W * s, divided by s
    float_weight, s = _layer()[0].weight.detach(), layer.weight.act_smooth if smoothing is not None else 1.0
    step = (float_weight * s).abs().amax(1, keepdim=True) / 127
    assert ((weight - float_weight).abs() <= step / 2 / s * (1 + 2.0 ** -20)).all()
    F.linear(reference, weight, layer.bias.detach()).backward(grad_out)
    # float32 dot products of 32 terms from weights rounded at most twice: (32 + 2) units of rounding
    bound = (32 + 2) * torch.finfo(torch.float32).eps / 2 * (grad_out.abs() @ weight.abs())
    assert ((x.grad - reference.grad).abs() <= bound).all()


def test_static_float8_smooths_its_activations_too():
    data = _data()
    models = {}
    for smoothing in (None, 0.5):
        model = lowbit.prepare(_layer(), lowbit.StaticFloat8(smoothing=smoothing))
        lowbit.calibrate(model, data, progress=False)
        models[smoothing] = lowbit.convert(model)
    weight = models[0.5][0].weight
    act_max = torch.stack(data).abs().amax((0, 1))
    expected_s = smoothing_factors(act_max, _layer()[0].weight.detach().abs().amax(0), 0.5)
    assert torch.equal(weight.act_smooth, expected_s) and models[None][0].weight.act_smooth is None
    assert models[0.5][0].lowbit_spec.weight.algorithm == "smoothquant"
    x = torch.cat(data)
    want = _layer()(x)
    with torch.no_grad():
        errors = {s: (m(x) - want).pow(2).mean() for s, m in models.items()}
    assert errors[0.5] < errors[None]  # outlier channels: smoothing lowers the per-tensor activation error
