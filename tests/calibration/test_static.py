"""The static flow: prepare -> calibrate -> convert, module swap, validation and accuracy."""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import MLP, relative_error

import lowbit
from lowbit.attention import QuantizedSDPA
from lowbit.calibration.static import OBSERVER_ATTR

STATIC = [lowbit.StaticInt8(), lowbit.StaticInt8(act_symmetric=True, smoothing=None, observer="minmax"),
          lowbit.StaticInt8(smoothing=None, observer="percentile"), lowbit.StaticFloat8()]


def _data(n=4):
    return [torch.randn(8, 64) for _ in range(n)]


@pytest.mark.parametrize("config", STATIC, ids=lambda c: c.label())
def test_prepare_calibrate_convert(config):
    model = MLP()
    data = _data()
    x = torch.randn(8, 64)
    expected = model(x)
    lowbit.prepare(model, config)
    assert isinstance(getattr(model.fc1, OBSERVER_ATTR), lowbit.calibration.Observer)
    torch.testing.assert_close(model(x), expected)  # observing changes nothing
    assert lowbit.calibrate(model, data, progress=False) == 4
    lowbit.convert(model)
    assert type(model.fc1) is nn.Linear and isinstance(model.fc1.weight, lowbit.StaticActivationTensor)
    assert not hasattr(model.fc1, OBSERVER_ATTR) and not model.fc1._forward_pre_hooks
    assert relative_error(model(x), expected) < 0.05


def test_static_quantization_is_static():
    model = MLP()
    lowbit.prepare(model, lowbit.StaticInt8(smoothing=None, observer="minmax"))
    lowbit.calibrate(model, _data(), progress=False)
    lowbit.convert(model)
    scale = float(model.fc1.weight.act_scale)
    x = torch.randn(2, 64) * 100  # far outside the calibrated range: saturates, scale unchanged
    model(x)
    assert float(model.fc1.weight.act_scale) == scale
    reference = model.fc1.weight.dequantize()
    assert relative_error(model.fc1(x), torch.nn.functional.linear(x, reference, model.fc1.bias)) > 0.5


def test_convert_before_calibration_raises_and_keeps_the_model():
    model = lowbit.prepare(MLP(), lowbit.StaticInt8())
    with pytest.raises(lowbit.NotCalibratedError, match="run lowbit.calibrate"):
        lowbit.convert(model)
    assert hasattr(model.fc1, OBSERVER_ATTR) and type(model.fc1.weight) is nn.Parameter


def test_flow_errors():
    with pytest.raises(ValueError, match="call lowbit.prepare"):
        lowbit.calibrate(MLP(), _data(), progress=False)
    with pytest.raises(TypeError, match="static config"):
        lowbit.prepare(MLP(), lowbit.Int8WeightOnly())
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.quantize_(MLP(), lowbit.StaticInt8())
    model = lowbit.prepare(MLP(), lowbit.StaticInt8())
    with pytest.raises(ValueError, match="already prepared"):
        lowbit.prepare(model, lowbit.StaticInt8())
    with pytest.raises(ValueError, match="smoothing"):
        lowbit.StaticInt8(smoothing=2.0)
    with pytest.raises(ValueError, match="observer must be one of"):
        lowbit.StaticInt8(observer="kmeans")


def test_calibrate_batches_and_max_batches():
    model = lowbit.prepare(MLP(), lowbit.StaticInt8())
    assert lowbit.calibrate(model, (torch.randn(2, 64) for _ in range(10)), max_batches=3, progress=False) == 3
    assert lowbit.calibrate(model, [(torch.randn(2, 64),)], progress=False) == 1
    assert lowbit.calibrate(model, [{"x": torch.randn(2, 64)}], progress=False) == 1


@pytest.mark.parametrize("config", STATIC, ids=lambda c: c.label())
def test_module_swap_matches_subclass(config):
    model = lowbit.prepare(MLP(), config)
    lowbit.calibrate(model, _data(), progress=False)
    swapped = lowbit.convert(copy.deepcopy(model), module_swap=True)
    subclassed = lowbit.convert(model)
    assert isinstance(swapped.fc1, lowbit.QuantizedLinear)
    x = torch.randn(5, 64)
    assert torch.equal(swapped(x), subclassed(x))


def test_static_model_compiles_exports_and_keeps_gradients():
    model = lowbit.prepare(MLP(), lowbit.StaticInt8())
    lowbit.calibrate(model, _data(), progress=False)
    lowbit.convert(model)
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))
    xg = x.clone().requires_grad_()
    model(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_state_dict_roundtrip_of_static_models():
    def make():
        model = lowbit.prepare(MLP(), lowbit.StaticInt8())
        lowbit.calibrate(model, _data(), progress=False)
        return lowbit.convert(model)

    source, target = make(), make()
    x = torch.randn(3, 64)
    target.load_state_dict(source.state_dict())
    assert torch.equal(source(x), target(x))


class _Attending(nn.Module):
    """A linear, calibrated attention, a linear: convert has three things to change, in that order."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 32)
        self.attend = QuantizedSDPA("int8", observer="minmax")

    def forward(self, x):
        h = self.fc1(x).unsqueeze(0)  # (1, B, 64)
        return self.fc2(self.attend(h, h, h).squeeze(0))


def test_convert_failing_on_a_later_layer_changes_nothing():
    model = lowbit.prepare(_Attending(), lowbit.StaticInt8())
    lowbit.calibrate(model, _data(), progress=False)
    intact = copy.deepcopy(model)
    finite = model.fc2.weight.detach().clone()
    with torch.no_grad():
        model.fc2.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="fc2.weight"):
        lowbit.convert(model)
    assert type(model.fc1.weight) is nn.Parameter and torch.equal(model.fc1.weight, intact.fc1.weight)
    assert hasattr(model.fc1, OBSERVER_ATTR) and model.fc1._forward_pre_hooks and not model.attend.frozen
    with torch.no_grad():
        model.fc2.weight.copy_(finite)
    x = torch.randn(5, 64)
    assert torch.equal(lowbit.convert(model)(x), lowbit.convert(intact)(x))  # the failed call lost nothing
