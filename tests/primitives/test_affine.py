"""Numerics of choose_qparams / quantize / dequantize (DESIGN.md, "Numerics")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.primitives import (
    check_block_size,
    check_finite,
    choose_qparams,
    dequantize,
    get_qtype,
    per_axis_block,
    per_group_block,
    per_token_block,
    quantize,
    quantize_weight,
)

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (qtype, symmetric): symmetric only with signed types, asymmetric with any integer type.
INT_SCHEMES = [
    ("int8", True),
    ("int4", True),
    ("int8", False),
    ("uint8", False),
    ("int4", False),
    ("uint4", False),
]
GRANULARITIES = ["per_tensor", "per_channel_0", "per_channel_1", "per_group"]
FLOAT8 = {
    # qtype: (half-ulp relative to |y| for normals, half of the subnormal spacing), y = x / scale
    "float8_e4m3fn": (2.0**-4, 2.0**-10),
    "float8_e5m2": (2.0**-3, 2.0**-17),
}


def block_for(shape: tuple[int, ...], granularity: str, group_size: int) -> tuple[int, ...]:
    if granularity == "per_tensor":
        return tuple(shape)
    if granularity == "per_channel_0":
        return per_axis_block(shape, 0)
    if granularity == "per_channel_1":
        return per_axis_block(shape, 1)
    return per_group_block(shape, group_size)


def expand(p: torch.Tensor, block_size) -> torch.Tensor:
    """Per-block parameter -> full element shape (one copy per element of its block)."""
    p = p.float()
    for dim, b in enumerate(block_size):
        p = p.repeat_interleave(b, dim=dim)
    return p


@st.composite
def float_data(draw, *, min_value=-1e3, max_value=1e3):
    """(x, group_size): a 2-D float32 tensor whose last dim is a multiple of group_size."""
    rows = draw(st.integers(1, 5))
    group_size = draw(st.sampled_from([1, 2, 4, 8]))
    groups = draw(st.integers(1, 4))
    elements = st.floats(min_value, max_value, width=32, allow_nan=False, allow_infinity=False)
    arr = draw(arrays(np.float32, (rows, groups * group_size), elements=elements))
    # Vary magnitudes across rows so per-channel scales differ a lot.
    return torch.from_numpy(arr.copy()), group_size


# --------------------------------------------------------------------------- round trip bounds


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("qtype,symmetric", INT_SCHEMES)
@HYP
@given(data=float_data())
def test_integer_roundtrip_error_at_most_half_scale(qtype, symmetric, granularity, data):
    x, group_size = data
    block = block_for(tuple(x.shape), granularity, group_size)
    qt = get_qtype(qtype)
    scale, zp = choose_qparams(x, block, qtype, symmetric=symmetric)
    assert scale.dtype == torch.float32
    assert tuple(scale.shape) == tuple(s // b for s, b in zip(x.shape, block))
    assert bool((scale > 0).all())
    if symmetric:
        assert zp is None
    else:
        assert zp is not None and zp.dtype == qt.storage and zp.shape == scale.shape
    q = quantize(x, scale, zp, block, qtype)
    assert q.dtype == qt.storage and q.shape == x.shape
    assert int(q.min()) >= qt.qmin and int(q.max()) <= qt.qmax
    xd = dequantize(q, scale, zp, block)
    assert xd.dtype == torch.float32 and xd.shape == x.shape
    s = expand(scale, block)
    bound = 0.5 * s * (1 + 1e-4) + 1e-6 * x.abs() + 1e-30
    err = (xd - x).abs()
    assert bool((err <= bound).all()), f"max err/scale {float((err / s).max())}"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("qtype", sorted(FLOAT8))
@HYP
@given(data=float_data())
def test_float8_roundtrip_relative_error(qtype, granularity, data):
    x, group_size = data
    block = block_for(tuple(x.shape), granularity, group_size)
    qt = get_qtype(qtype)
    rel, sub = FLOAT8[qtype]
    scale, zp = choose_qparams(x, block, qtype)
    assert zp is None
    q = quantize(x, scale, None, block, qtype)
    assert q.dtype == qt.storage and q.shape == x.shape
    assert bool(torch.isfinite(q.float()).all())
    assert float(q.float().abs().max()) <= qt.qmax
    xd = dequantize(q, scale, None, block)
    s = expand(scale, block)
    # Half an ulp of the float8 grid in the scaled domain y = x / scale, plus float32 slack.
    bound = (rel + 1e-6) * x.abs() + sub * s * (1 + 1e-5) + 1e-30
    err = (xd - x).abs()
    assert bool((err <= bound).all()), f"max rel err {float((err / x.abs().clamp(min=1e-30)).max())}"


@pytest.mark.parametrize("qtype", sorted(FLOAT8))
def test_float8_block_max_maps_to_finfo_max(qtype):
    x = torch.tensor([[1.0, -3.0, 0.25, 2.0], [0.5, 0.125, -0.0625, 0.03125]])
    block = per_axis_block(x.shape, 0)
    scale, _ = choose_qparams(x, block, qtype)
    fmax = torch.finfo(get_qtype(qtype).storage).max
    torch.testing.assert_close(scale.flatten(), torch.tensor([3.0, 0.5]) / fmax)
    q = quantize(x, scale, None, block, qtype)
    assert float(q.float()[0, 1]) == -fmax
    assert float(q.float()[1, 0]) == fmax


# --------------------------------------------------------------------------- rounding


def test_round_half_to_even_symmetric():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    q = quantize(x, torch.ones(1, 1), None, (1, 7), "int8")
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 4]]


def test_round_half_to_even_with_non_unit_scale():
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -1.25]])
    q = quantize(x, torch.full((1, 1), 0.5), None, (1, 5), "int4")
    assert q.tolist() == [[0, 2, 2, 0, -2]]


@pytest.mark.parametrize("qtype", ["uint8", "uint4", "int8", "int4"])
def test_zero_point_added_after_rounding(qtype):
    # round(x/scale) + zp: 2.5 -> 2 -> 5 ; adding first would give round(5.5) = 6.
    x = torch.tensor([[2.5, 0.5, 1.5, -0.5, -2.5]])
    zp = torch.full((1, 1), 3, dtype=get_qtype(qtype).storage)
    q = quantize(x, torch.ones(1, 1), zp, (1, 5), qtype)
    assert q.tolist() == [[5, 3, 5, 3, 1]]
    # dequantize subtracts the zero point again
    assert dequantize(q, torch.ones(1, 1), zp, (1, 5)).tolist() == [[2.0, 0.0, 2.0, 0.0, -2.0]]


def test_quantize_clamps_to_qtype_range():
    x = torch.tensor([[100.0, -100.0, 7.4, -8.4]])
    assert quantize(x, torch.ones(1, 1), None, (1, 4), "int4").tolist() == [[7, -8, 7, -8]]
    zp = torch.full((1, 1), 8, dtype=torch.uint8)
    assert quantize(x, torch.ones(1, 1), zp, (1, 4), "uint4").tolist() == [[15, 0, 15, 0]]


def test_symmetric_scale_formula():
    x = torch.tensor([[-1.0, 0.5, 0.25, 0.0], [2.0, -0.5, 0.0, 0.0]])
    scale, zp = choose_qparams(x, (1, 4), "int8")
    assert zp is None
    torch.testing.assert_close(scale, torch.tensor([[1.0], [2.0]]) / 127)
    scale, _ = choose_qparams(x, (2, 4), "int4")
    torch.testing.assert_close(scale, torch.tensor([[2.0 / 7]]))


def test_asymmetric_scale_and_zero_point_formula():
    x = torch.tensor([[-1.0, 0.0, 2.0, 0.5]])
    scale, zp = choose_qparams(x, (1, 4), "uint8", symmetric=False)
    torch.testing.assert_close(scale, torch.tensor([[3.0 / 255]]))
    assert zp.dtype == torch.uint8 and zp.tolist() == [[85]]  # 0 - round(-1 / (3/255)) = 85
    # Ranges always include 0: all-positive data gets zp = qmin, all-negative zp = qmax.
    _, zp = choose_qparams(torch.tensor([[1.0, 2.0]]), (1, 2), "int4", symmetric=False)
    assert zp.dtype == torch.int8 and zp.tolist() == [[-8]]
    _, zp = choose_qparams(torch.tensor([[-1.0, -2.0]]), (1, 2), "int4", symmetric=False)
    assert zp.tolist() == [[7]]


@pytest.mark.parametrize("qtype", sorted(FLOAT8))
def test_float8_rejects_asymmetric(qtype):
    with pytest.raises(ValueError, match="symmetric"):
        choose_qparams(torch.ones(2, 2), (2, 2), qtype, symmetric=False)


# --------------------------------------------------------------------------- exact zero


@pytest.mark.parametrize("sign", ["mixed", "positive", "negative"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", ["int8", "uint8", "int4", "uint4"])
@settings(max_examples=15, deadline=None)
@given(data=float_data(min_value=-100.0, max_value=100.0), seed=st.integers(0, 2**16))
def test_asymmetric_zero_is_exact(qtype, scale_dtype, sign, data, seed):
    x, group_size = data
    if sign == "positive":
        x = x.abs() + 0.5
    elif sign == "negative":
        x = -x.abs() - 0.5
    gen = torch.Generator().manual_seed(seed)
    zero_mask = torch.rand(x.shape, generator=gen) < 0.3
    zero_mask.view(-1)[0] = True
    x = torch.where(zero_mask, torch.zeros_like(x), x)
    qt = get_qtype(qtype)
    for block in (tuple(x.shape), per_axis_block(x.shape, 0), per_group_block(x.shape, group_size)):
        scale, zp = choose_qparams(x, block, qtype, symmetric=False, scale_dtype=scale_dtype)
        assert scale.dtype == scale_dtype
        assert zp.dtype == qt.storage
        assert int(zp.min()) >= qt.qmin and int(zp.max()) <= qt.qmax
        xd = dequantize(quantize(x, scale, zp, block, qtype), scale, zp, block)
        assert bool((xd[zero_mask] == 0.0).all())
        assert bool(torch.isfinite(xd).all())


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_symmetric_zero_is_exact(qtype):
    x = torch.tensor([[0.0, 0.3, -1.7, 0.0], [5.0, 0.0, 0.0, -0.0]])
    for block in [(2, 4), (1, 4), (1, 2), (2, 1)]:
        scale, zp = choose_qparams(x, block, qtype)
        xd = dequantize(quantize(x, scale, zp, block, qtype), scale, zp, block)
        assert bool((xd[x == 0] == 0).all())


# --------------------------------------------------------------------------- scale floor


CASES_FOR_FLOOR = [(q, s) for q, s in INT_SCHEMES] + [(q, True) for q in sorted(FLOAT8)]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype,symmetric", CASES_FOR_FLOOR)
def test_all_zero_blocks_use_dtype_tiny_and_dequantize_to_zero(qtype, symmetric, scale_dtype):
    tiny = torch.finfo(scale_dtype).tiny
    x = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 0.25],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [3.0, -1.0, 0.5, 2.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    for block, zero_blocks in [
        ((1, 8), [(1, 0)]),
        ((1, 4), [(0, 0), (1, 0), (1, 1), (2, 1)]),
    ]:
        scale, zp = choose_qparams(x, block, qtype, symmetric=symmetric, scale_dtype=scale_dtype)
        assert scale.dtype == scale_dtype
        for idx in zero_blocks:
            assert scale[idx].item() == tiny, (block, idx, scale[idx].item())
        q = quantize(x, scale, zp, block, qtype)
        xd = dequantize(q, scale, zp, block)
        assert not bool(torch.isnan(xd).any())
        assert bool((xd[x == 0] == 0).all())
        # Zero blocks quantize to the zero point itself.
        zero = 0 if zp is None else expand(zp, block)
        assert bool((q.float()[x == 0] == (zero if zp is None else zero[x == 0])).all())

    whole = torch.zeros(4, 6)
    scale, zp = choose_qparams(whole, (4, 6), qtype, symmetric=symmetric, scale_dtype=scale_dtype)
    assert scale.item() == tiny
    xd = dequantize(quantize(whole, scale, zp, (4, 6), qtype), scale, zp, (4, 6), torch.bfloat16)
    assert xd.dtype == torch.bfloat16 and bool((xd == 0).all())


def test_tiny_scale_floor_is_not_an_eps_clamp():
    # A block with a genuinely small range must keep a small scale (bf16 eps ~ 7.8e-3 would be wrong).
    x = torch.tensor([[1e-4, -2e-4, 5e-5, 0.0]])
    scale, _ = choose_qparams(x, (1, 4), "int8", scale_dtype=torch.bfloat16)
    assert scale.item() < 1e-5
    q = quantize(x, scale, None, (1, 4), "int8")
    assert int(q.abs().max()) >= 126


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight_raises_naming_tensor(bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"layer\.weight"):
        choose_qparams(x, (1, 8), "int8", name="layer.weight")
    with pytest.raises(ValueError, match=r"layer\.weight"):
        choose_qparams(x, (4, 8), "uint4", symmetric=False, name="layer.weight")
    with pytest.raises(ValueError, match=r"layer\.weight"):
        choose_qparams(x, (1, 8), "float8_e4m3fn", name="layer.weight")
    with pytest.raises(ValueError, match=r"layer\.weight"):
        quantize_weight(x, (1, 4), "int4", name="layer.weight")
    with pytest.raises(ValueError, match=r"layer\.weight"):
        check_finite(x, "layer.weight")
    check_finite(torch.randn(3, 3), "fine")


def test_nonfinite_bf16_weight_raises():
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    x[1, 1] = float("inf")
    with pytest.raises(ValueError, match="enc.w"):
        choose_qparams(x, (1, 4), "int8", name="enc.w")


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="my.t"):
        choose_qparams(torch.ones(2, 2, dtype=torch.int32), (1, 2), "int8", name="my.t")


@pytest.mark.parametrize("qtype,symmetric", INT_SCHEMES)
def test_nonfinite_activations_saturate(qtype, symmetric):
    qt = get_qtype(qtype)
    x = torch.tensor([[float("inf"), float("-inf"), float("nan"), 1.0, -0.5, 0.25]])
    block = (1, 6)
    scale, zp = choose_qparams(x, block, qtype, symmetric=symmetric, ignore_nonfinite=True)
    # Statistics ignore the non-finite entries: the range is set by the finite ones.
    finite = torch.tensor([[1.0, -0.5, 0.25]])
    ref_scale, ref_zp = choose_qparams(finite, (1, 3), qtype, symmetric=symmetric)
    torch.testing.assert_close(scale, ref_scale)
    if symmetric:
        assert zp is None
    else:
        assert zp.tolist() == ref_zp.tolist()
    q = quantize(x, scale, zp, block, qtype, saturate_nonfinite=True)
    zero = 0 if zp is None else int(zp.item())
    assert q[0, 0].item() == qt.qmax
    assert q[0, 1].item() == qt.qmin
    assert q[0, 2].item() == zero
    xd = dequantize(q, scale, zp, block)
    assert xd[0, 2].item() == 0.0
    assert bool(torch.isfinite(xd).all())
    torch.testing.assert_close(xd[:, 3:], finite, atol=float(scale) / 2 * 1.001, rtol=0)


@pytest.mark.parametrize("qtype", sorted(FLOAT8))
def test_nonfinite_activations_saturate_float8(qtype):
    qt = get_qtype(qtype)
    x = torch.tensor([[float("inf"), float("-inf"), float("nan"), 2.0, -1.0]])
    scale, zp = choose_qparams(x, (1, 5), qtype, ignore_nonfinite=True)
    assert zp is None
    torch.testing.assert_close(scale, torch.tensor([[2.0 / qt.qmax]]))
    q = quantize(x, scale, None, (1, 5), qtype, saturate_nonfinite=True).float()
    assert q[0].tolist()[:3] == [qt.qmax, qt.qmin, 0.0]


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype,symmetric", INT_SCHEMES + [("float8_e4m3fn", True)])
def test_half_precision_inputs(in_dtype, out_dtype, qtype, symmetric):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 16, generator=gen) * 3).to(in_dtype)
    block = per_group_block(x.shape, 8)
    scale, zp = choose_qparams(x, block, qtype, symmetric=symmetric)
    q = quantize(x, scale, zp, block, qtype)
    xd = dequantize(q, scale, zp, block, out_dtype)
    assert xd.dtype == out_dtype and xd.shape == x.shape
    # Same codes as quantizing the exactly-representable float32 copy.
    q32 = quantize(x.float(), *choose_qparams(x.float(), block, qtype, symmetric=symmetric), block, qtype)
    assert torch.equal(q.float(), q32.float())
    ref = dequantize(q, scale, zp, block).to(out_dtype)
    assert torch.equal(xd, ref)
    s = expand(scale, block)
    if get_qtype(qtype).is_float:
        bound = 2.0**-4 * x.float().abs() + s
    else:
        bound = 0.5 * s * 1.001
    out_eps = torch.finfo(out_dtype).eps
    assert bool(((xd.float() - x.float()).abs() <= bound + out_eps * x.float().abs()).all())


# --------------------------------------------------------------------------- block sizes


def test_check_block_size_ok():
    assert check_block_size((4, 8), (1, 4)) == (1, 4)
    assert check_block_size([4, 8], [4, 8]) == (4, 8)
    assert check_block_size((2, 3, 6), (1, 3, 2)) == (1, 3, 2)


@pytest.mark.parametrize(
    "block",
    [(1,), (1, 4, 1), (1, 3), (3, 8), (0, 8), (1, -4), (1, 16)],
)
def test_check_block_size_errors_name_shape(block):
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        check_block_size((4, 8), block)
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        choose_qparams(torch.ones(4, 8), block, "int8")


def test_block_helpers():
    assert per_axis_block((4, 8), 0) == (1, 8)
    assert per_axis_block((4, 8), 1) == (4, 1)
    assert per_axis_block((4, 8), -1) == (4, 1)
    assert per_axis_block((2, 3, 5), 1) == (2, 1, 5)
    assert per_group_block((4, 8), 4) == (1, 4)
    assert per_group_block((2, 3, 8), 2) == (1, 1, 2)
    assert per_token_block((2, 3, 8)) == (1, 1, 8)


@pytest.mark.parametrize("group_size", [3, 5, 16, 0, -2])
def test_per_group_block_rejects_non_dividing(group_size):
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        per_group_block((4, 8), group_size)


def test_three_dim_per_group_shapes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=gen)
    block = per_group_block(x.shape, 4)
    scale, zp = choose_qparams(x, block, "uint4", symmetric=False)
    assert scale.shape == (2, 3, 2) and zp.shape == (2, 3, 2)
    xd = dequantize(quantize(x, scale, zp, block, "uint4"), scale, zp, block)
    assert bool(((xd - x).abs() <= 0.5 * expand(scale, block) * 1.0001).all())
    # Each group gets its own statistics.
    torch.testing.assert_close(
        scale[1, 2, 0], (x[1, 2, :4].clamp(min=0).max() - x[1, 2, :4].clamp(max=0).min()) / 15
    )


# --------------------------------------------------------------------------- docstrings


def test_docstring_examples():
    scale, zp = choose_qparams(torch.tensor([[-1.0, 0.5]]), (1, 2), "int8")
    assert round(scale.item() * 127, 6) == 1.0 and zp is None
    q = quantize(torch.tensor([[0.5, 1.5, -2.5]]), torch.ones(1, 1), None, (1, 3), "int8")
    assert q.dtype == torch.int8 and q.tolist() == [[0, 2, -2]]
    xd = dequantize(torch.tensor([[0, 2]], dtype=torch.int8), torch.full((1, 1), 0.5), None, (1, 2))
    assert xd.tolist() == [[0.0, 1.0]]
    q, scale, zp = quantize_weight(torch.randn(4, 8), (1, 8), "int8")
    assert q.dtype == torch.int8 and tuple(scale.shape) == (4, 1) and zp is None


def test_quantize_weight_matches_parts():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 16, generator=gen)
    q, scale, zp = quantize_weight(w, (1, 4), "uint4", symmetric=False)
    s2, z2 = choose_qparams(w, (1, 4), "uint4", symmetric=False)
    assert torch.equal(scale, s2) and torch.equal(zp, z2)
    assert torch.equal(q, quantize(w, s2, z2, (1, 4), "uint4"))


def test_bf16_scale_keeps_half_scale_bound_asymmetric():
    x = torch.tensor([[-11.0625, 12.375]])
    scale, zp = choose_qparams(x, (1, 2), "uint8", symmetric=False, scale_dtype=torch.bfloat16)
    xd = dequantize(quantize(x, scale, zp, (1, 2), "uint8"), scale, zp, (1, 2))
    assert float((xd - x).abs().max()) <= 0.5 * float(scale) * 1.001
