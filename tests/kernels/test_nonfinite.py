"""Non-finite activations follow one rule in every linear kernel: a NaN anywhere in an input row makes
every output of that row NaN, +-inf saturate at the row's range (as the reference kernel does), and the
other rows are exactly what they are without the non-finite values."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import avx512, onednn_linear
from linear_cases import CASES, assert_within, case_id, error_bound, quantized, reference_of

NAN, INF = float("nan"), float("inf")


def _activations(rows: int, k: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """x (rows, k) with NaN rows 0 and 3 (row 3 also holds an inf), inf rows 1 and 2; the rest finite."""
    x = torch.randn(rows, k) * torch.linspace(0.1, 4, k)
    x[0, 5] = NAN
    x[1, 7] = INF
    x[2, 9], x[2, 11] = -INF, INF
    x[3, 0], x[3, k - 1] = INF, NAN
    return x, [0, 3], [1, 2]


@pytest.mark.parametrize("rows", [5, avx512.GEMV_ROWS_INT8 + 5], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("k", [256, 160], ids=["K256", "K160"])  # with and without the int4 GEMV's 128-k blocks
@pytest.mark.parametrize("config", CASES, ids=case_id)
def test_nan_rows_are_nan_inf_saturates_other_rows_unaffected(config, k, rows):
    weight, bias = torch.randn(37, k) / k**0.5, torch.randn(37)
    q = quantized(config, weight)
    x, nan_rows, inf_rows = _activations(rows, k)
    out = F.linear(x, q, bias)
    assert torch.isnan(out[nan_rows]).all(), "a NaN in an input row must make every output of that row NaN"
    others = [r for r in range(rows) if r not in nan_rows]
    assert torch.isfinite(out[others]).all(), "rows without NaN must stay finite (inf saturates)"
    clean = F.linear(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), q, bias)
    finite_rows = [r for r in others if r not in inf_rows]
    assert torch.equal(out[finite_rows], clean[finite_rows]), "finite rows must not depend on the non-finite ones"
    if config.kernel != "reference":
        ref = reference_of(config, weight)
        expected = F.linear(x, ref, bias)
        assert_within(out[inf_rows], expected[inf_rows], error_bound(config, ref, x, bias)[inf_rows], "inf rows")


@pytest.mark.parametrize("config", [c for c in CASES if c.kernel == "reference" and c.scheme in ("int8", "int4", "float8")],
                         ids=case_id)
def test_reference_weight_only_saturates_inf_at_the_rows_largest_finite_magnitude(config):
    q = quantized(config, torch.randn(12, 64))
    x = torch.randn(3, 64)
    x[0, 3], x[2, 5], x[2, 6] = INF, -INF, INF
    saturated = x.clone()
    for r in (0, 2):
        largest = x[r][torch.isfinite(x[r])].abs().max()
        saturated[r] = torch.where(torch.isinf(x[r]), largest.copysign(x[r]), x[r])
    assert torch.equal(F.linear(x, q), F.linear(saturated, q))
