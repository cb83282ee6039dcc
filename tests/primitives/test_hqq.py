"""HQQ's qparams: choose_qparams's layout, integer zero points, and never a larger block error than RTN's."""

from __future__ import annotations

import pytest
import torch

from lowbit.primitives import choose_qparams, dequantize, get_qtype, quantize
from lowbit.primitives.blocks import block_dims, to_blocks
from lowbit.primitives.hqq import hqq_qparams

# (qtype, symmetric) as the weight specs pair them
SCHEMES = [("int4", True), ("uint4", False), ("uint3", False), ("uint2", False), ("int8", True)]
BLOCKS = {"per_group": (1, 32), "per_channel": (1, 256)}


def _weight(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(48, 256, generator=g) * 0.02
    # Student-t with 2 degrees of freedom: a few large values per block stretch the min/max range
    normal, chi2 = torch.randn(48, 256, generator=g), torch.randn(2, 48, 256, generator=g).square().sum(0)
    return 0.02 * normal / (chi2 / 2).sqrt()


def _block_error(w, scale, zero, block, qtype) -> torch.Tensor:
    error = w - dequantize(quantize(w, scale, zero, block, qtype), scale, zero, block)
    return to_blocks(error.square(), block).sum(block_dims(w.dim()))


@pytest.mark.parametrize("kind", ["normal", "heavy_tailed"])
@pytest.mark.parametrize("granularity", BLOCKS)
@pytest.mark.parametrize("qtype,symmetric", SCHEMES)
def test_block_error_never_above_rtn_and_lower_in_total(qtype, symmetric, granularity, kind):
    """Each block keeps RTN's qparams unless HQQ's reconstruct it better, so no block is worse; in total HQQ is
    strictly better: the least-squares scale of a block's grid differs from its min/max scale unless every value
    lands on the grid."""
    w, block = _weight(kind), BLOCKS[granularity]
    rtn = _block_error(w, *choose_qparams(w, block, qtype, symmetric=symmetric), block, qtype)
    hqq = _block_error(w, *hqq_qparams(w, block, qtype, symmetric=symmetric), block, qtype)
    assert (hqq <= rtn).all()
    assert hqq.sum() < rtn.sum()


@pytest.mark.parametrize("qtype,symmetric", SCHEMES)
def test_layout_dtypes_and_integer_zero_points_as_choose_qparams(qtype, symmetric):
    w, block = _weight("heavy_tailed"), (1, 32)
    want_scale, want_zero = choose_qparams(w, block, qtype, symmetric=symmetric)
    scale, zero = hqq_qparams(w, block, qtype, symmetric=symmetric)
    assert scale.shape == want_scale.shape and scale.dtype == torch.float32
    assert (scale >= torch.finfo(torch.float32).tiny).all()
    if symmetric:
        assert zero is None
        return
    qt = get_qtype(qtype)
    assert zero.shape == want_zero.shape and zero.dtype == want_zero.dtype == qt.storage
    assert ((zero.int() >= qt.qmin) & (zero.int() <= qt.qmax)).all()


@pytest.mark.parametrize("qtype,symmetric", SCHEMES)
def test_zero_stays_exact_and_all_zero_blocks_give_zeros(qtype, symmetric):
    w, block = _weight("heavy_tailed"), (1, 32)
    w[::3, ::5] = 0.0
    w[5] = 0.0  # whole blocks of zeros
    scale, zero = hqq_qparams(w, block, qtype, symmetric=symmetric)
    out = dequantize(quantize(w, scale, zero, block, qtype), scale, zero, block)
    assert torch.isfinite(scale).all()
    assert (out[w == 0] == 0).all()


def test_bf16_weight_fits_like_its_float32_values():
    w = _weight("heavy_tailed").bfloat16()
    got = hqq_qparams(w, (1, 32), "uint4", symmetric=False)
    want = hqq_qparams(w.float(), (1, 32), "uint4", symmetric=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises_naming_it(bad):
    w = _weight("normal")
    w[3, 7] = bad
    with pytest.raises(ValueError, match="layer.weight holds 1 non-finite"):
        hqq_qparams(w, (1, 32), "uint4", symmetric=False, name="layer.weight")


def test_float_qtypes_and_bad_options_are_refused():
    w = _weight("normal")
    with pytest.raises(ValueError, match="integer grids; received the float qtype float8_e4m3fn"):
        hqq_qparams(w, (1, 32), "float8_e4m3fn", symmetric=True)
    with pytest.raises(ValueError, match="0 < p <= 1.*received p=1.5"):
        hqq_qparams(w, (1, 32), "uint4", symmetric=False, p=1.5)
    with pytest.raises(ValueError, match="must be positive and divide"):
        hqq_qparams(w, (1, 30), "uint4", symmetric=False)


@pytest.mark.parametrize("qtype", ["uint4", "uint3", "uint2"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_signed_blocks_keep_zero_points_in_range(qtype, sign):
    """All-positive (all-negative) blocks start at the range's end (zero point qmin or qmax): the fit may push the float
    zero point past it, and the integer one is clamped back."""
    w, qt = sign * (_weight("heavy_tailed").abs() + 0.01), get_qtype(qtype)
    zero = hqq_qparams(w, (1, 32), qtype, symmetric=False)[1].int()
    assert ((zero >= qt.qmin) & (zero <= qt.qmax)).all()


def test_scales_of_subnormal_weights_stay_at_the_floor():
    w = _weight("heavy_tailed") * 2e-37  # min/max scales near float32's smallest normal; the fit may shrink them
    scale, zero = hqq_qparams(w, (1, 32), "uint3", symmetric=False)
    assert (scale >= torch.finfo(torch.float32).tiny).all()
    assert torch.isfinite(dequantize(quantize(w, scale, zero, (1, 32), "uint3"), scale, zero, (1, 32))).all()
