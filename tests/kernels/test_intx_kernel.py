"""The avx512 intx kernel (bit planes, VNNI GEMV for few rows, bf16 decode + GEMM above) against F.linear on
the dequantized weight, computed in float64, on canonical tensors built here from random codes with pack_bits.

Bounds (the derivation of linear_cases.py for int4, whose paths these mirror), per output (m, n):
* GEMV (M <= 8): the 16-bit activation split errs by at most (0.5 + 2^-8) max|x[m]| / 32639 per element
  (linear_cases._split_error times sum_k |W[n, k]|); group sums are exact int32, and the float steps after them
  (conversion, group scales, the zero-point correction, lane sums, bias) round at most 2K + 8 times on terms
  bounded by |x| * scale * (code + zero point): the correction cancels, so its magnitude counts both.
* bf16 decode + GEMM: activations, weights and the GEMM's result each rounded to bf16 once (2^-8 relative),
  plus the float epilogue.
A bf16 input gets its result rounded to bf16 once more.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from linear_cases import U, _split_error, assert_within, bf16_roundings

import lowbit
from lowbit.kernels.intx import GEMV_ROWS_INTX, pack_planes, plane_decode_unavailable
from lowbit.kernels.reference import saturate_inf
from lowbit.kernels.registry import select_kernel
from lowbit.primitives import pack_bits

pytestmark = pytest.mark.skipif(plane_decode_unavailable() is not None, reason=f"intx kernel: {plane_decode_unavailable()}")

BITS = (2, 3, 4, 5, 6, 7)
GROUPS = (32, 64, 128, 256)
ROWS = (1, 3, 8, 9, 33)  # GEMV (one and several tiles of activation rows) and decoded GEMM
N = 13  # odd: three tiles of four weight rows and one row alone


def canonical(bits: int, signed: bool, n: int, k: int, group: int, seed: int = 0, codes: torch.Tensor | None = None):
    """(tensors, meta, codes and zero points as the GEMV multiplies them, dequantized weight float64) of an intx
    weight (n, k) in the canonical layout: random codes (or ``codes``), scales and zero points."""
    gen = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    lo, hi = (-half, half) if signed else (0, 2 * half)
    q = torch.randint(lo, hi, (n, k), generator=gen) if codes is None else codes
    q = q.to(torch.int8 if signed else torch.uint8)
    scale = torch.rand(n, k // group, generator=gen) * 0.1 + 1e-3
    tensors = {"qdata": pack_bits(q, bits), "scale": scale}
    if signed:
        zero = torch.zeros(n, k // group)
    else:
        zero = torch.randint(0, 2 * half, (n, k // group), generator=gen, dtype=torch.uint8)
        tensors["zero_point"] = zero
    meta = {"qtype": f"{'' if signed else 'u'}int{bits}", "block_size": (1, group), "shape": (n, k),
            "dtype": torch.float32, "packed_dim": 1}
    groups = lambda t: t.double().repeat_interleave(group, -1)  # noqa: E731
    weight = (q.double() - groups(zero)) * groups(scale)
    offset = half if signed else 0  # signed codes run offset by 2^(bits-1), which is then their zero point
    codes_and_zeros = (q.double() + offset + groups(zero) + offset) * groups(scale)
    return tensors, meta, codes_and_zeros, weight


def run(tensors, meta, x, bias=None):
    """The registered kernel on x, with its packed layout made as quantize_ makes it."""
    kernel = select_kernel("linear", "intx", "cpu", "avx512", meta)
    return kernel.fn(x, {**tensors, **kernel.pack(tensors, meta)}, meta, bias)


def expected_and_bound(x, weight, codes_and_zeros, bias, gemv: bool):
    """F.linear of the inf-saturated x on the dequantized weight (float64) and the bound of the kernel's path."""
    act = saturate_inf(x.float()).double()
    bias_abs = 0.0 if bias is None else bias.double().abs()
    expected = act @ weight.T + (0.0 if bias is None else bias.double())
    act_abs, k = act.nan_to_num(0.0).abs(), x.shape[-1]
    if gemv:
        bound = _split_error(x.float(), weight.float()).double() + (2 * k + 8) * U * (act_abs @ codes_and_zeros.T + bias_abs)
    else:
        bound = (bf16_roundings(3) + (2 * k + 8) * U) * (act_abs @ weight.abs().T + bias_abs)
    if x.dtype == torch.bfloat16:
        bound = bound + (expected.abs() + bound) * 2.0**-8
    return expected, bound


@pytest.mark.parametrize("k_groups", [1, 3])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("signed", [False, True], ids=["uint", "int"])
@pytest.mark.parametrize("bits", BITS)
def test_matches_dequantized_linear(bits, signed, group, k_groups):
    k = group * k_groups
    tensors, meta, codes_and_zeros, weight = canonical(bits, signed, N, k, group, seed=bits * 100 + group + k_groups)
    for i, m in enumerate(ROWS):
        x = torch.randn(m, k) * torch.linspace(0.05, 3, k)  # a spread of magnitudes within each row
        bias = torch.randn(N) if i % 2 else None
        out = run(tensors, meta, x, bias)
        assert out.shape == (m, N) and out.dtype == torch.float32
        expected, bound = expected_and_bound(x, weight, codes_and_zeros, bias, m <= GEMV_ROWS_INTX)
        assert_within(out.double(), expected, bound, f"{meta['qtype']} G={group} K={k} M={m} bias={bias is not None}")


@pytest.mark.parametrize("rows", [3, 12])
@pytest.mark.parametrize("signed", [False, True], ids=["uint", "int"])
def test_nonfinite_rows(rows, signed):
    """A NaN makes its row's outputs NaN; +-inf saturate at the row's largest finite magnitude; other rows keep
    their values."""
    tensors, meta, codes_and_zeros, weight = canonical(3, signed, N, 128, 32, seed=rows)
    x = torch.randn(rows, 128)
    x[0, 5] = float("nan")
    x[1, 7], x[1, 100] = float("inf"), float("-inf")
    bias = torch.randn(N)
    out = run(tensors, meta, x, bias)
    assert out[0].isnan().all() and not out[1:].isnan().any()
    expected, bound = expected_and_bound(x[1:], weight, codes_and_zeros, bias, rows <= GEMV_ROWS_INTX)
    assert_within(out[1:].double(), expected, bound, "finite and inf rows")


@pytest.mark.parametrize("rows", [1, 12])
def test_bf16_input(rows):
    tensors, meta, codes_and_zeros, weight = canonical(5, False, N, 256, 64, seed=rows)
    x = torch.randn(rows, 256).to(torch.bfloat16)
    bias = torch.randn(N)
    out = run(tensors, meta, x, bias)
    assert out.dtype == torch.bfloat16
    expected, bound = expected_and_bound(x, weight, codes_and_zeros, bias, rows <= GEMV_ROWS_INTX)
    assert_within(out.double(), expected, bound, f"bf16 input, M={rows}")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_group_sums_do_not_overflow(sign):
    """The largest codes (7 bits) times activations at the split's ends in groups of 256: every int32 lane sum of a
    chunk is at its largest, and the result is still the exact dot product (up to float rounding)."""
    codes = torch.full((N, 512), 127)
    tensors, meta, codes_and_zeros, weight = canonical(7, False, N, 512, 256, codes=codes)
    tensors["zero_point"].zero_()
    weight = codes.double() * tensors["scale"].double().repeat_interleave(256, -1)
    x = torch.full((2, 512), sign * 3.0)  # r = +-32639 everywhere: hi = +-127 and lo = +-127 in every lane
    out = run(tensors, meta, x)
    expected = x.double() @ weight.T
    assert_within(out.double(), expected, (2 * 512 + 8) * U * expected.abs(), "largest group sums")


def test_weight_packed_along_dim0_packs_to_the_same_planes():
    """An (in, out) weight packed along its rows (transposed to (N, K) for the linear) gives the same planes as the
    row-major stream, in blocks of rows (300 rows: more than one block, not a multiple of 8)."""
    tensors, meta, _, _ = canonical(3, True, 300, 64, 32)
    q = torch.randint(-4, 4, (300, 64), generator=torch.Generator().manual_seed(1)).to(torch.int8)
    rows = dict(tensors, qdata=pack_bits(q, 3, dim=-1))
    columns = dict(tensors, qdata=pack_bits(q, 3, dim=0))
    assert torch.equal(pack_planes(columns, dict(meta, packed_dim=0))["packed"], pack_planes(rows, meta)["packed"])


def test_planes_hold_bit_p_of_each_offset_code():
    """Golden layout: a chunk of 256 codes is four blocks, block u holding the 4-code words 4i + u (byte p: k = 16 * (p // 4)
    + 4u + p % 4); plane p of a block is bit p of each code, signed codes offset by 2^(bits-1). K = 96 ends inside the
    chunk, whose codes past K are 0 (the GEMV multiplies them with whatever its activation buffer holds there)."""
    q = torch.arange(96).remainder(8).sub(4).reshape(1, 96).to(torch.int8)  # int3 codes -4..3 repeating
    tensors, meta, _, _ = canonical(3, True, 1, 96, 32, codes=q)
    planes = pack_planes(tensors, meta)["packed"].view(torch.int64).reshape(4, 3)  # four blocks of three planes
    unsigned = torch.cat([q.flatten().long() + 4, torch.zeros(160, dtype=torch.long)])  # 0..7 repeating, then padding
    for block in range(4):
        codes = [int(unsigned[16 * (j // 4) + 4 * block + j % 4]) for j in range(64)]
        for p in range(3):
            expected = sum(((code >> p) & 1) << j for j, code in enumerate(codes))
            assert planes[block, p].item() & (2**64 - 1) == expected


def test_auto_picks_it_and_bad_calls_raise():
    tensors, meta, _, _ = canonical(2, False, N, 64, 32)
    assert select_kernel("linear", "intx", "cpu", "auto", meta).name == "avx512"
    with pytest.raises(ValueError, match="expected 64 input features"):
        run(tensors, meta, torch.randn(2, 32))
    odd = dict(meta, block_size=(1, 16), shape=(N, 64))  # a group size the kernel does not take: the registry's decision
    assert select_kernel("linear", "intx", "cpu", "auto", odd).name == "reference"
    with pytest.raises(RuntimeError, match="kernel 'avx512' for linear on 'intx' weights cannot run here: does not take "
                                           "groups of 16 input features"):
        select_kernel("linear", "intx", "cpu", "avx512", odd)


def test_quantized_model_compiles_and_exports():
    from conftest import assert_compiles_and_exports

    model = nn.Sequential(nn.Linear(64, 24))
    lowbit.quantize_(model, lowbit.IntxWeightOnly(bits=3, group_size=32))
    assert model[0].weight.packed is not None  # packed for the avx512 kernel at quantize time
    assert_compiles_and_exports(model, torch.randn(2, 64), "lowbit.intx_gemv")
