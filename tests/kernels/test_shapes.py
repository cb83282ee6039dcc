"""Every linear kernel on shapes below its tiles and odd sizes (K or N of 1, tails) agrees with the
reference kernel within the bound of its path's math (see linear_cases)."""

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.kernels import onednn_linear
from lowbit.kernels.registry import kernel_names, select_kernel
from linear_cases import FAST_CASES, assert_within, case_id, error_bound, quantized, reference_of

KS = [1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 127, 129]
INT4_KS = [32, 96, 128, 160, 256]  # multiples of the group: with and without the GEMV's 128-k blocks
NS = [1, 2, 15, 16, 17, 33]
MS = [1, 2, 7, 8, 9, 17, 33]  # both sides of every kernel's few-row limit
SHAPE_CASES = [(case, k) for case in FAST_CASES for k in (INT4_KS if case.scheme == "int4" else KS)]


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("config, k", SHAPE_CASES, ids=lambda v: case_id(v) if hasattr(v, "label") else f"K{v}")
def test_kernel_matches_reference_on_small_and_odd_shapes(config, k, n):
    weight, bias = torch.randn(n, k) / k**0.5, torch.randn(n)
    fast, ref = quantized(config, weight), reference_of(config, weight)
    for m in MS:
        x = torch.randn(m, k) * torch.linspace(0.1, 4, k)
        expected = F.linear(x, ref, bias)
        assert_within(F.linear(x, fast, bias), expected, error_bound(config, ref, x, bias), f"M={m} K={k} N={n}")


ONE_ROW_OR_GROUP = [
    (lowbit.Int8WeightOnly(), (1, 64)),  # one row: per_tensor and per_row
    (lowbit.Int8DynamicActivation(), (1, 1)),
    (lowbit.Float8WeightOnly(), (1, 64)),
    (lowbit.Int4WeightOnly(group_size=32), (16, 32)),  # one group per row: per_row and per_group
    (lowbit.Int4WeightOnly(group_size=32), (1, 32)),  # all three
]


@pytest.mark.parametrize("config, shape", ONE_ROW_OR_GROUP, ids=lambda v: case_id(v) if hasattr(v, "label") else str(v))
def test_one_row_and_one_group_weights_take_the_fast_kernels(config, shape):
    """Every kernel registered for the scheme takes such a weight (none refuses it for its granularity)."""
    q = quantized(config, torch.randn(shape))
    tensors, meta = q.kernel_inputs()
    for name in kernel_names("linear", q.scheme, "cpu"):  # the CUDA kernels' shapes: test_cuda_kernels
        assert select_kernel("linear", q.scheme, "cpu", name, meta).name == name
