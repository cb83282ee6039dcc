"""SmoothedTensor: a quantized weight of ``W * s`` whose linear divides its input by ``s`` first (AWQ, SmoothQuant)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.tensors.from_spec import quantize_weight
from lowbit.tensors.smoothed import SmoothedTensor

CONFIGS = [
    lowbit.Int8WeightOnly(),
    lowbit.Int4WeightOnly(group_size=32),
    lowbit.IntxWeightOnly(bits=3),
    lowbit.Float8WeightOnly(),
    lowbit.Int8DynamicActivation(),
    lowbit.Float8DynamicActivation(),
]
U = 2.0 ** -24  # float32 unit roundoff


def _smoothed(config, n=16, k=64, kernel="auto"):
    w, s = torch.randn(n, k), torch.rand(k) * 3 + 0.25
    return quantize_weight(w * s, config.spec(), kernel=kernel, smooth=s), s


def _reassociation_bound(x, q, s):
    """|F.linear(x / s, Q) - F.linear(x, Q / s)|: each of the K terms is rounded twice more on one side (the
    division of x or of Q, the product), and the K-term sums differ by at most (K - 1) u of the absolute sum."""
    k = x.shape[-1]
    return (k + 3) * U * (x.abs() / s) @ q.abs().t()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__ + str(getattr(c, "bits", "")))
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_linear_divides_input_then_runs_inner_kernel(config, kernel):
    t, s = _smoothed(config, kernel=kernel)
    x, b = torch.randn(5, 64), torch.randn(16)
    assert isinstance(t, SmoothedTensor) and torch.equal(t.act_smooth, s)
    assert torch.equal(F.linear(x, t, b), F.linear(x / s, t.weight, b))


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: type(c).__name__ + str(getattr(c, "bits", "")))
def test_weight_only_equals_float_linear_on_effective_weight(config):
    t, s = _smoothed(config, kernel="reference")
    q = t.weight.dequantize(torch.float32)
    torch.testing.assert_close(t.dequantize(), q / s, rtol=0, atol=0)
    x = torch.randn(5, 64)
    err = (F.linear(x, t) - F.linear(x, t.dequantize())).abs()
    assert (err <= _reassociation_bound(x, q, s)).all()


@pytest.mark.parametrize("smooth, message", [
    (torch.ones(63), r"shape \(64,\)"), (torch.ones(64, 1), r"shape \(64,\)"),
    (torch.tensor([0.0] + [1.0] * 63), "finite and positive"), (torch.tensor([-1.0] + [1.0] * 63), "finite and positive"),
    (torch.tensor([float("inf")] + [1.0] * 63), "finite and positive"),
    (torch.tensor([float("nan")] + [1.0] * 63), "finite and positive"),
])
def test_bad_smoothing_divisors_are_refused(smooth, message):
    with pytest.raises(ValueError, match=message):
        quantize_weight(torch.randn(16, 64), lowbit.Int8WeightOnly().spec(), smooth=smooth)


def test_embedding_conv_and_bmm_are_refused():
    t, _ = _smoothed(lowbit.Int8WeightOnly())
    with pytest.raises(NotImplementedError, match="linear layers only"):
        F.embedding(torch.tensor([0, 3]), t)
    with pytest.raises(NotImplementedError, match="linear layers only"):
        torch.bmm(torch.randn(2, 3, 16), t)
    with pytest.raises(NotImplementedError, match="linear layers only"):
        F.conv1d(torch.randn(1, 64, 5), t)


def test_conv1d_addmm_on_transposed_weight():
    t, s = _smoothed(lowbit.Int8DynamicActivation())
    x, b = torch.randn(4, 64), torch.randn(16)
    assert torch.equal(torch.addmm(b, x, t.t()), F.linear(x, t, b))
    assert torch.equal(t.t().dequantize(), t.dequantize().t())


def test_copies_moves_and_dtype():
    t, s = _smoothed(lowbit.Int4WeightOnly(group_size=32))
    x = torch.randn(3, 64)
    for other in (t.clone(), t.detach(), copy.deepcopy(t)):
        assert isinstance(other, SmoothedTensor) and torch.equal(F.linear(x, other), F.linear(x, t))
    half = t.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.act_smooth.dtype == torch.float32
    xb = x.bfloat16()
    assert torch.equal(F.linear(xb, half), F.linear(xb / s.bfloat16(), half.weight))
    dst, _ = _smoothed(lowbit.Int4WeightOnly(group_size=32))
    dst.copy_(t)
    assert torch.equal(F.linear(x, dst), F.linear(x, t))
    with pytest.raises(ValueError, match="expected a SmoothedTensor"):
        dst.copy_(t.weight)


def test_input_gradient_goes_through_effective_weight():
    t, s = _smoothed(lowbit.Int8DynamicActivation())
    x = torch.randn(3, 64, requires_grad=True)
    F.linear(x, t).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 16) @ t.dequantize())


def test_compiles_fullgraph():
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))
    for layer in (model[0], model[2]):
        s = torch.rand(layer.in_features) + 0.5
        q = quantize_weight(layer.weight.detach() * s, lowbit.Int8DynamicActivation().spec(), smooth=s)
        layer.weight = nn.Parameter(q, requires_grad=False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0, atol=0)
