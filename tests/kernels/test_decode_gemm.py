"""The decode GEMMs (weights decoded to bf16 panel by panel inside an AVX512-BF16 GEMM) against float64 on the same
bf16 activation rows and the weights decoded as the bf16 decode always did: int8 and e4m3 exact, int4 and intx
(q - zero) * scale rounded to bf16 half to even.

Bound per output (m, n), with u = 2^-24 and magnitude = sum_k |x[m, k] W[n, k]| |w_scale[n] row_scale[m]| + |b[n]|:
the products of bf16 values are exact in float32 and K of them are summed in float32 (gamma_K), then one rounding
for the weight scale and one for the fused row scale and bias, so (K + 4) u * magnitude covers it; a bf16 output
is rounded once more, 2^-8 of its value.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_cases import U, assert_within, case_id, error_bound, quantized, reference_of

import lowbit
from lowbit.kernels import avx512, decode_gemm
from lowbit.kernels.intx import pack_planes, plane_decode_unavailable
from lowbit.primitives import pack_bits
from lowbit.primitives.packing import pack_int4

pytestmark = pytest.mark.skipif(decode_gemm.unavailable() is not None, reason=f"decode GEMM: {decode_gemm.unavailable()}")
needs_planes = pytest.mark.skipif(plane_decode_unavailable() is not None, reason=f"intx: {plane_decode_unavailable()}")

FINITE_E4M3 = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


def weights(kind: str, n: int, k: int, group: int = 0, bits: int = 3, gen=None):
    """(call, decoded): call(rows, row_scale, bias, bf16_out) runs the kind's decode GEMM on a random (n, k) weight,
    decoded (n, k) float64 is that weight as the kernel's bf16 decode gives it, times the per-row weight scale."""
    if kind == "int8":
        q, w_scale = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen), torch.rand(n, generator=gen) + 0.5
        call = lambda rows, rs, bias, bf16: decode_gemm.int8_decode_gemm(rows, rs, q, w_scale, bias, bf16)  # noqa: E731
        return call, q.double() * w_scale.double()[:, None]
    if kind.startswith("e4m3"):
        codes = FINITE_E4M3[torch.randint(0, len(FINITE_E4M3), (n, k), generator=gen)]
        w_scale = torch.rand(1 if kind == "e4m3_tensor" else n, generator=gen) + 0.5
        call = lambda rows, rs, bias, bf16: decode_gemm.fp8_decode_gemm(rows, rs, codes, w_scale, bias, bf16)  # noqa: E731
        return call, codes.view(torch.float8_e4m3fn).double() * w_scale.double().expand(n)[:, None]
    signed = kind.endswith("symmetric")
    width = 4 if kind.startswith("int4") else bits
    half = 1 << (width - 1)
    q = torch.randint(-half if signed else 0, half if signed else 2 * half, (n, k), generator=gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.1 + 1e-3
    zero = None if signed else torch.randint(0, 2 * half, (n, k // group), dtype=torch.uint8, generator=gen)
    groups = lambda t: t.float().repeat_interleave(group, -1)  # noqa: E731
    decoded = ((q.float() - (0 if zero is None else groups(zero))) * groups(scale)).to(torch.bfloat16).double()
    if kind.startswith("int4"):
        packed = pack_int4(q.to(torch.int8 if signed else torch.uint8))
        call = lambda rows, rs, bias, bf16: decode_gemm.int4_decode_gemm(rows, rs, packed, scale, zero, bias, group, bf16)  # noqa: E731
        return call, decoded
    tensors = {"qdata": pack_bits(q.to(torch.int8 if signed else torch.uint8), width), "scale": scale}
    meta = {"qtype": f"{'' if signed else 'u'}int{width}", "shape": (n, k), "packed_dim": 1}
    planes = pack_planes(tensors, meta)["packed"]
    call = lambda rows, rs, bias, bf16: decode_gemm.intx_decode_gemm(rows, rs, planes, scale, zero, bias, group, width, bf16)  # noqa: E731
    return call, decoded


# (kind, group, K): K ends part-way through a 256-k panel (odd for the byte codes), groups of 32 and 128
KINDS = [("int8", 0, 301), ("e4m3_row", 0, 301), ("e4m3_tensor", 0, 77), ("int4_symmetric", 32, 288),
         ("int4_zero", 32, 288), ("int4_zero", 128, 640), ("int4_symmetric", 128, 384),
         pytest.param("intx_zero", 64, 320, marks=needs_planes), pytest.param("intx_symmetric", 32, 544, marks=needs_planes)]
ROWS = (9, 17, 64, 130)  # one 16-row block part-used, a pair of blocks and one alone, several pairs


@pytest.mark.parametrize("bf16_out", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("kind, group, k", KINDS, ids=lambda v: str(v))
def test_decode_gemm_matches_float64_on_the_decoded_weight(kind, group, k, bf16_out):
    gen = torch.Generator().manual_seed(0)
    n = 37  # three 12-row tiles and a row, split between threads
    call, weight = weights(kind, n, k, group, gen=gen)
    for m in ROWS:
        rows = (torch.randn(m, k, generator=gen) * torch.linspace(0.1, 4, k)).to(torch.bfloat16)
        for row_scale, bias in ((torch.ones(m), None), (torch.rand(m, generator=gen) + 0.5, torch.randn(n, generator=gen))):
            out = call(rows, row_scale, bias, bf16_out)
            assert out.dtype == (torch.bfloat16 if bf16_out else torch.float32) and out.shape == (m, n)
            scaled = row_scale.double()[:, None]
            bias64 = 0.0 if bias is None else bias.double()
            expected = rows.double() @ weight.T * scaled + bias64
            bound = (k + 4) * U * ((rows.double().abs() @ weight.abs().T) * scaled + abs(bias64))
            if bf16_out:
                bound = bound + 2.0**-8 * (expected.abs() + bound)
            assert_within(out.double(), expected, bound, f"{kind} M={m} K={k} bias={bias is not None}")


def test_an_activation_of_more_than_8_mb_takes_wider_weight_blocks():
    """M x K past 8 MB of bf16 pairs: the kernel walks N in blocks of up to 192 rows (the same products)."""
    gen = torch.Generator().manual_seed(4)
    m, n, k = 300, 200, 14001
    call, weight = weights("e4m3_row", n, k, gen=gen)
    rows, bias = torch.randn(m, k, generator=gen).to(torch.bfloat16), torch.randn(n, generator=gen)
    expected = rows.double() @ weight.T + bias.double()
    bound = (k + 4) * U * (rows.double().abs() @ weight.abs().T + bias.double().abs())
    assert_within(call(rows, torch.ones(m), bias, False).double(), expected, bound, "wide blocks")


@pytest.mark.parametrize("kind, group, k", [("int8", 0, 256), ("e4m3_row", 0, 254 * 2), ("int4_zero", 32, 288),
                                            ("int4_symmetric", 64, 320), ("int4_zero", 256, 512),
                                            pytest.param("intx_zero", 128, 256, marks=needs_planes)], ids=lambda v: str(v))
def test_one_hot_rows_give_the_decoded_weight_exactly(kind, group, k):
    """x = identity: each output is one product (exact) times the scales, so the kernel's decode shows bit for bit
    (every int8 value, every finite e4m3 code, int4 codes rounded to bf16 at groups of 32 to 256)."""
    gen = torch.Generator().manual_seed(1)
    call, weight = weights(kind, 19, k, group, gen=gen)
    out = call(torch.eye(k, dtype=torch.bfloat16), torch.ones(k), None, False)
    assert torch.equal(out, weight.T.float())


@pytest.mark.parametrize("bf16_out", [False, True], ids=["float32", "bf16"])
def test_nan_rows_are_nan_inf_saturates_other_rows_unaffected(bf16_out):
    """The activation rule through bf16_rows: a row holding a NaN has row_scale NaN and every output NaN; +-inf rows
    saturate (finite); the other rows equal the same call without the non-finite rows."""
    gen = torch.Generator().manual_seed(2)
    call, _ = weights("int4_zero", 21, 256, 32, gen=gen)
    x = torch.randn(20, 256, generator=gen)
    x[3, 5], x[7, 0], x[7, 9], x[11, 255] = float("nan"), float("inf"), float("-inf"), float("nan")
    bias = torch.randn(21, generator=gen)
    out = call(*avx512.bf16_rows(x), bias, bf16_out)
    assert torch.isnan(out[[3, 11]]).all()
    others = [r for r in range(20) if r not in (3, 11)]
    assert torch.isfinite(out[others]).all()
    finite = [r for r in others if r != 7]
    assert torch.equal(out[finite], call(*avx512.bf16_rows(x[finite]), bias, bf16_out))


def test_bad_activation_rows_are_refused():
    call, _ = weights("int8", 4, 32)
    with pytest.raises(ValueError, match="bf16 activation rows"):
        call(torch.randn(9, 32), torch.ones(9), None, False)
    with pytest.raises(ValueError, match="one value per activation row"):
        call(torch.randn(9, 32).to(torch.bfloat16), torch.ones(8), None, False)


def test_fake_kernels_match_the_ops():
    gen = torch.Generator().manual_seed(3)
    rows, row_scale = torch.randn(10, 64, generator=gen).to(torch.bfloat16), torch.ones(10)
    q = torch.randint(-128, 128, (5, 64), dtype=torch.int8, generator=gen)
    for bf16_out in (False, True):
        torch.library.opcheck(torch.ops.lowbit.int8_decode_gemm.default, (rows, row_scale, q, torch.ones(5), torch.randn(5), bf16_out))
    packed = pack_int4(torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=gen))
    scale, zero = torch.rand(5, 2, generator=gen), torch.randint(0, 16, (5, 2), dtype=torch.uint8, generator=gen)
    torch.library.opcheck(torch.ops.lowbit.int4_decode_gemm.default, (rows, row_scale, packed, scale, zero, None, 32, True))
    codes = FINITE_E4M3[torch.randint(0, len(FINITE_E4M3), (5, 64), generator=gen)]
    torch.library.opcheck(torch.ops.lowbit.fp8_decode_gemm.default, (rows, row_scale, codes, torch.ones(1), None, False))


FALLBACK_CONFIGS = [lowbit.Int8WeightOnly(kernel="avx512"), lowbit.Int4WeightOnly(group_size=32, kernel="avx512"),
                    lowbit.Float8WeightOnly(kernel="avx512"), lowbit.Float8DynamicActivation(kernel="avx512")]


@pytest.mark.parametrize("config", FALLBACK_CONFIGS, ids=case_id)
def test_cpus_without_avx512_bf16_decode_for_onednn_instead(config, monkeypatch):
    """Without AVX512-BF16 the avx512 kernels take the weight decoded to bf16 a block of rows at a time for oneDNN's
    GEMM (int8: two int8 GEMMs on the 16-bit split), within the bound of that path."""
    weight, bias = torch.randn(40, 160) / 160**0.5, torch.randn(40)
    q, ref = quantized(config, weight), reference_of(config, weight)
    x = torch.randn(avx512.GEMV_ROWS_INT8 + 5, 160)
    fused = F.linear(x, q, bias)
    monkeypatch.setattr(decode_gemm, "unavailable", lambda device_type="cpu": "no AVX512-BF16 (test)")
    fallback = F.linear(x, q, bias)
    assert not torch.equal(fused, fallback), "the fallback path must be a different computation"
    assert_within(fallback, F.linear(x, ref, bias), error_bound(config, ref, x, bias), "fallback")
