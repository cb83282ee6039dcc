"""The straight-through fake quantization QAT trains with: the same values as quantize -> dequantize, rounding's
gradient passed straight through, clipping's gradient zero outside the range, LSQ's scale gradient."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.primitives.affine import choose_qparams
from lowbit.primitives.qtypes import get_qtype
from lowbit.primitives.fake_quantize import fake_quantize, fake_quantize_ste, ste_round

QTYPES = [("int8", True), ("uint8", False), ("int4", True), ("uint4", False), ("uint3", False), ("int2", True),
          ("float8_e4m3fn", True), ("float8_e5m2", True)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(-4, 4), qtype=st.sampled_from(QTYPES),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_values_are_bit_identical_to_quantize_dequantize(seed, spread, qtype, dtype):
    name, symmetric = qtype
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(8, 64, generator=g) * 10.0 ** torch.empty(64).uniform_(-abs(spread), abs(spread), generator=g)).to(dtype)
    scale, zero_point = choose_qparams(x, (1, 16), name, symmetric=symmetric)
    expected = fake_quantize(x, (1, 16), name, symmetric=symmetric, scale=scale, zero_point=zero_point)
    got = fake_quantize_ste(x, scale, None if zero_point is None else zero_point.float(), (1, 16), name)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_halves_round_to_even_through_the_estimator():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])
    assert ste_round(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


@pytest.mark.parametrize("name,symmetric", [("int8", True), ("uint4", False), ("float8_e4m3fn", True)])
def test_gradient_is_straight_through_inside_the_range_and_zero_where_clipped(name, symmetric):
    """Round, then clip: a value whose rounding stays in range passes its gradient (a dynamic scale puts each
    block's extreme at the range's end, where x / scale may land a float step above it)."""
    x = torch.linspace(-3, 3, 64).reshape(1, 64).requires_grad_()
    scale, zero_point = choose_qparams(torch.linspace(-1, 1, 64).reshape(1, 64), (1, 64), name, symmetric=symmetric)
    y = fake_quantize_ste(x, scale, None if zero_point is None else zero_point.float(), (1, 64), name)
    y.sum().backward()
    qt = get_qtype(name)
    scaled = x.detach() / scale
    if qt.is_float:  # values that round to e4m3fn's largest, 448 (its last step is 32), are not clipped
        inside = scaled.abs() < 448 + 16
    else:
        unclipped = torch.round(scaled) + (0 if zero_point is None else zero_point.float())
        inside = (unclipped >= qt.qmin) & (unclipped <= qt.qmax)
    assert 0 < int(inside.sum()) < 64
    assert torch.equal(x.grad, inside.float())


def test_scale_and_zero_point_gradients_are_lsq():
    """d/ds of (clamp(round(x/s) + z) - z) * s is round(x/s) - x/s inside the range and the clipped end's value
    (qmax - z or qmin - z) outside; d/dz is 0 inside and -s outside (LSQ / LSQ+)."""
    x = torch.tensor([[-2.0, -0.37, 0.0, 0.26, 0.9, 5.0]])
    s = torch.tensor([[0.05]], requires_grad=True)
    z = torch.tensor([[3.0]], requires_grad=True)
    fake_quantize_ste(x, s, z, (1, 6), "uint4").sum().backward()
    scaled = x / 0.05
    q = torch.round(scaled) + 3
    low, high = q < 0, q > 15
    expected_s = torch.where(low, 0 - 3.0, torch.where(high, 15 - 3.0, torch.round(scaled) - scaled)).sum()
    expected_z = (-(0.05) * (low | high).float()).sum()
    torch.testing.assert_close(s.grad.squeeze(), expected_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.grad.squeeze(), expected_z)


@pytest.mark.parametrize("name,low,high", [("int8", (-128.4, -128.6), (127.4, 127.6)),
                                           ("float8_e4m3fn", (-460.0, -470.0), (460.0, 470.0)),
                                           ("float8_e5m2", (-60000.0, -62000.0), (60000.0, 62000.0))])
def test_a_value_rounding_to_the_range_end_keeps_its_gradient(name, low, high):
    x = torch.tensor([[high[0], high[1], low[0], low[1]]], requires_grad=True)
    fake_quantize_ste(x, torch.ones(1, 1), None, (1, 4), name).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]
