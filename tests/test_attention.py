"""F.scaled_dot_product_attention on quantized query/key/value, dynamic and calibrated."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import relative_error

import lowbit
from lowbit.attention import QuantizedSDPA, quantize_activation

QTYPES = ["int8", "float8_e4m3fn"]


def _qkv(batch=2, heads=4, tokens=16, dim=32, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(batch, heads, tokens, dim, dtype=dtype) for _ in range(3)]


def _round_trip(x, qtype, granularity, symmetric):
    """x quantized and read back, written out from the formulas: per token (last dim) or per tensor,
    scale = max|x| / qmax, or (max(x, 0) - min(x, 0)) / 255 with an integer zero point (asymmetric int8)."""
    dims = (-1,) if granularity == "per_token" else tuple(range(x.dim()))
    if qtype == "float8_e4m3fn":
        scale = x.abs().amax(dim=dims, keepdim=True) / 448
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    if symmetric:
        scale = x.abs().amax(dim=dims, keepdim=True) / 127
        return torch.round(x / scale).clamp(-128, 127) * scale
    lo, hi = x.amin(dim=dims, keepdim=True).clamp(max=0), x.amax(dim=dims, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 255
    zero_point = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    return ((torch.round(x / scale) + zero_point).clamp(-128, 127) - zero_point) * scale


@pytest.mark.parametrize("qtype, symmetric", [("int8", True), ("int8", False), ("float8_e4m3fn", True)])
@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_sdpa_on_quantized_inputs_attends_to_their_quantized_values(qtype, symmetric, granularity):
    q, k, v = _qkv()
    quantized = [quantize_activation(x, qtype, granularity, symmetric=symmetric) for x in (q, k, v)]
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(*quantized, attn_mask=mask)
    expected = F.scaled_dot_product_attention(*[_round_trip(x, qtype, granularity, symmetric) for x in (q, k, v)], attn_mask=mask)
    assert torch.equal(out, expected)
    error = relative_error(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert error < (0.02 if qtype == "int8" else 0.06), error


def test_mixed_plain_and_quantized_inputs_causal_gqa_and_bf16():
    q, k, v = _qkv(dtype=torch.bfloat16)
    k, v = k[:, :2], v[:, :2]  # grouped-query attention: 4 query heads share 2 key/value heads
    out = F.scaled_dot_product_attention(q, quantize_activation(k), quantize_activation(v), is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert relative_error(out.float(), expected.float()) < 0.03


def test_quantize_activation_numerics_and_errors():
    x = torch.tensor([[0.0, 1.0, float("inf"), float("nan")], [0.0, 0.0, 0.0, 0.0]])
    q = quantize_activation(x, "int8", symmetric=False)
    assert q.dequantize()[0, 0] == 0 and torch.equal(q.dequantize()[1], torch.zeros(4))  # exact zeros, no NaN
    assert q.dequantize()[0, 2] == q.dequantize()[0].max()  # +inf saturates
    with pytest.raises(ValueError, match="qtype must be one of"):
        quantize_activation(x, "int3")
    with pytest.raises(ValueError, match="calibrated scale is per tensor"):
        quantize_activation(x, scale=torch.tensor(0.1))
    with pytest.raises(TypeError, match="plain float tensor"):
        quantize_activation(torch.ones(2, dtype=torch.int64))


class Attention(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.proj = nn.Linear(32, 96)
        self.attend = attend

    def forward(self, x):  # (B, T, 32)
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        return self.attend(q, k, v, is_causal=True)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_sdpa_module_calibrates_with_the_static_flow(qtype):
    torch.manual_seed(0)
    model = Attention(QuantizedSDPA(qtype, observer="minmax"))
    with pytest.raises(lowbit.NotCalibratedError, match="run lowbit.calibrate"):
        lowbit.convert(model)
    x = torch.randn(2, 8, 32)
    expected = model(x)  # calibrating: float attention (and x's range is observed)
    lowbit.calibrate(model, [torch.randn(2, 8, 32) for _ in range(4)], progress=False)
    lowbit.convert(model)
    assert model.attend.frozen and "static" in repr(model.attend)
    assert relative_error(model(x), expected) < (0.03 if qtype == "int8" else 0.08)
    restored = Attention(QuantizedSDPA(qtype, observer="minmax"))
    restored.load_state_dict(model.state_dict())  # frozen scales are buffers
    assert torch.equal(restored(x), model(x))


def test_dynamic_quantized_sdpa_module_and_bad_arguments():
    torch.manual_seed(0)
    model = Attention(QuantizedSDPA("int8"))
    x = torch.randn(2, 8, 32)
    plain = Attention(lambda q, k, v, **kw: F.scaled_dot_product_attention(q, k, v, **kw))
    plain.proj = model.proj
    assert relative_error(model(x), plain(x)) < 0.03
    with pytest.raises(ValueError, match="qtype must be one of"):
        QuantizedSDPA("int2")
    with pytest.raises(ValueError, match="observer must be None"):
        QuantizedSDPA("int8", observer="magic")
