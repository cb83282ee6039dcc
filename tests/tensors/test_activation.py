"""DynamicActivationTensor: activations are quantized per call before the matmul."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit import ActivationQuant, DynamicActivationTensor, Float8Tensor, Int8Tensor
from lowbit.primitives import choose_qparams, dequantize, quantize


def _wrap(w, act=ActivationQuant()):
    return DynamicActivationTensor.wrap(Int8Tensor.from_float(w, (1, w.shape[1])), act)


@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_equals_quantized_activation_times_quantized_weight(symmetric, device):
    w = torch.randn(32, 64, device=device)
    q = _wrap(w, ActivationQuant("int8", "per_token", symmetric))
    x = torch.randn(2, 5, 64, device=device)
    scale, zp = choose_qparams(x, (1, 1, 64), "int8", symmetric=symmetric)
    xq = dequantize(quantize(x, scale, zp, (1, 1, 64), "int8"), scale, zp, (1, 1, 64))
    torch.testing.assert_close(F.linear(x, q), F.linear(xq, q.dequantize()))
    assert not torch.equal(F.linear(x, q), F.linear(x, q.dequantize()))  # activations really are quantized


def test_float8_per_tensor_activation(device):
    w = torch.randn(32, 64, device=device)
    inner = Float8Tensor.from_float(w, (32, 64))
    q = DynamicActivationTensor.wrap(inner, ActivationQuant("float8_e4m3fn", "per_tensor"))
    x = torch.randn(4, 64, device=device)
    rel = (F.linear(x, q) - F.linear(x, w)).norm() / F.linear(x, w).norm()
    assert rel < 0.1


def test_nonfinite_activations_saturate(device):
    q = _wrap(torch.randn(8, 16, device=device))
    x = torch.randn(3, 16, device=device)
    x[0, 0], x[1, 3], x[2, 5] = float("inf"), float("-inf"), float("nan")
    y = F.linear(x, q)
    assert torch.isfinite(y[:2]).all() and torch.isnan(y[2]).all()  # a NaN in a row makes that output row NaN
    clean = x.clone()
    clean[0, 0] = clean[0, 1:].abs().max()
    torch.testing.assert_close(y[0], F.linear(clean, q)[0])


def test_ops_delegate_to_the_weight(device):
    q = _wrap(torch.randn(32, 64, device=device))
    assert type(q.t()) is DynamicActivationTensor and q.t().shape == (64, 32)
    assert torch.equal(q[:16].dequantize(), q.dequantize()[:16])
    assert [p.shape[0] for p in q.split(16)] == [16, 16]
    assert q.to(torch.bfloat16).dtype == torch.bfloat16 and q.to(torch.bfloat16).weight.dtype == torch.bfloat16
    assert (q.weight.packed_aux is None) == (q.to(torch.bfloat16).weight.packed_aux is None)  # a dtype move keeps packing
    assert torch.equal(copy.deepcopy(q).dequantize(), q.dequantize())
    x = torch.randn(4, 64, device=device)
    torch.testing.assert_close(torch.mm(x, q.t()), F.linear(x, q))
    b = torch.randn(32, device=device)
    torch.testing.assert_close(torch.addmm(b, x, q.t()), F.linear(x, q, b))


def test_copy_requires_the_same_activation_scheme(device):
    w = torch.randn(8, 16, device=device)
    a, b = _wrap(w), _wrap(w, ActivationQuant("int8", "per_tensor"))
    with pytest.raises(ValueError, match="dynamic"), torch.no_grad():
        a.copy_(b)
    other = _wrap(torch.randn(8, 16, device=device))
    with torch.no_grad():
        a.copy_(other)
    assert torch.equal(a.dequantize(), other.dequantize())


def test_activation_quant_validates():
    with pytest.raises(ValueError, match="granularity"):
        ActivationQuant("int8", "per_channel")
    with pytest.raises(ValueError, match="symmetric"):
        ActivationQuant("float8_e4m3fn", symmetric=False)
    with pytest.raises(ValueError, match="activation qtype must be one of .*received 'int3'"):
        ActivationQuant("int3")


def test_unimplemented_op_is_loud(device):
    q = _wrap(torch.randn(8, 16, device=device))
    with pytest.raises(NotImplementedError, match="DynamicActivationTensor does not implement aten.add"):
        q + 1
