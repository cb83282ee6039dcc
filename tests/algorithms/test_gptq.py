"""GPTQ's arithmetic on plain tensors: its grid, its error compensation, its numerical guard."""

import pytest
import torch

from lowbit.algorithms.gptq import HessianCollector, clipped_qparams, gptq_quantize
from lowbit.primitives.affine import dequantize, quantize
from lowbit.primitives.fake_quantize import fake_quantize
from lowbit.specs import weight_spec

SPECS = [  # (spec, block size for a (32, 256) weight)
    (weight_spec("int4", "uint4", 64), (1, 64)),
    (weight_spec("int4", "int4", 32), (1, 32)),
    (weight_spec("intx", "uint3", 32), (1, 32)),
    (weight_spec("intx", "uint2", 32), (1, 32)),
    (weight_spec("int8", "int8"), (1, 256)),
    (weight_spec("float8", "float8_e4m3fn"), (1, 256)),
]


def _correlated_inputs(tokens=1024, features=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5
    return torch.randn(tokens, features, generator=g) @ mix * torch.linspace(0.2, 3.0, features) + 0.5


def _hessian(x):
    collector = HessianCollector(x.shape[1])
    for part in x.split(100):
        collector.add(part)
    return collector.hessian


def test_hessian_is_the_running_mean_of_2_xtx_and_skips_non_finite_tokens():
    x = _correlated_inputs(300, 16)
    collector = HessianCollector(16)
    for part in x.split(70):
        collector.add(part)
    collector.add(torch.full((3, 16), float("nan")))
    torch.testing.assert_close(collector.hessian, 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-5)
    assert collector.tokens == 300


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec, block", SPECS, ids=lambda v: getattr(v, "qtype", ""))
def test_values_lie_on_the_grid_and_the_output_error_is_below_round_to_nearest(spec, block, act_order):
    torch.manual_seed(0)
    x, w = _correlated_inputs(), torch.randn(32, 256) * 0.05
    w_hat, scale, zero_point = gptq_quantize(w, _hessian(x), spec, block, act_order=act_order)
    assert scale.shape == (32, 256 // block[1]) and (zero_point is None) == spec.symmetric
    codes = quantize(w_hat, scale, zero_point, block, spec.qtype)
    assert torch.equal(dequantize(codes, scale, zero_point, block), w_hat)  # re-quantizing gives the very codes
    error = lambda v: (x @ (w - v).t()).pow(2).mean()  # noqa: E731
    assert error(w_hat) < 0.8 * error(fake_quantize(w, block, spec.qtype, symmetric=spec.symmetric))


@pytest.mark.parametrize("spec, block", SPECS[:3] + SPECS[4:5], ids=lambda v: getattr(v, "qtype", ""))
def test_with_uncorrelated_inputs_of_equal_variance_gptq_is_round_to_nearest(spec, block):
    # H = c I: no error is propagated (the inverse Hessian has no off-diagonal terms)
    w = torch.randn(16, 256) * 0.05
    w_hat, _, _ = gptq_quantize(w, torch.eye(256) * 3.0, spec, block)
    torch.testing.assert_close(w_hat, fake_quantize(w, block, spec.qtype, symmetric=spec.symmetric), rtol=0, atol=0)


def test_dead_input_columns_are_zeroed_and_nothing_is_nan():
    x = _correlated_inputs(512, 64)
    x[:, 5] = 0.0
    w = torch.randn(8, 64)
    w_hat, scale, zero_point = gptq_quantize(w, _hessian(x), weight_spec("int4", "uint4", 32), (1, 32))
    assert torch.isfinite(w_hat).all() and torch.isfinite(scale).all()
    assert (w_hat[:, 5] == 0).all()


def test_a_rank_deficient_hessian_is_damped_and_a_negative_one_is_refused():
    x = torch.randn(4, 64)  # 4 tokens: rank 4 of 64
    w = torch.randn(8, 64)
    w_hat, _, _ = gptq_quantize(w, 2 * x.t() @ x / 4, weight_spec("int4", "uint4", 32), (1, 32))
    assert torch.isfinite(w_hat).all()
    with pytest.raises(ValueError, match="not positive definite even with damping"):
        gptq_quantize(w, -torch.eye(64), weight_spec("int4", "uint4", 32), (1, 32))


def test_lazy_block_updates_do_not_change_the_result():
    x, w = _correlated_inputs(), torch.randn(16, 256) * 0.05
    spec, h = weight_spec("int4", "uint4", 32), _hessian(x)
    one, _, _ = gptq_quantize(w, h, spec, (1, 32), block_columns=32)
    many, _, _ = gptq_quantize(w, h, spec, (1, 32), block_columns=256)
    # the same arithmetic summed in another order: scales differ in their last bits, and a code may flip where a
    # value sits on a rounding boundary (then the flip's error propagates to later columns)
    moved = ~torch.isclose(one, many, rtol=1e-5, atol=1e-7)
    assert moved.float().mean() < 0.01


@pytest.mark.parametrize("qtype, symmetric", [("uint3", False), ("int4", True), ("uint2", False)])
def test_clipped_ranges_never_raise_a_blocks_error_and_lower_it_on_heavy_tails(qtype, symmetric):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 128))
    block = (1, 32)
    error = lambda qp: (w - dequantize(quantize(w, *qp, block, qtype), *qp, block)).abs().pow(2.4)  # noqa: E731
    full, clipped = clipped_qparams(w, block, qtype, symmetric=symmetric, steps=0), clipped_qparams(
        w, block, qtype, symmetric=symmetric, steps=10)
    per_block = lambda e: e.reshape(64, 4, 32).sum(-1)  # noqa: E731
    assert (per_block(error(clipped)) <= per_block(error(full))).all()
    assert per_block(error(clipped)).sum() < per_block(error(full)).sum()
    assert (clipped[0] <= full[0]).all() and (clipped[0] < full[0]).any()


def test_clip_steps_lower_gptqs_output_error():
    x, w = _correlated_inputs(), torch.distributions.StudentT(2.0).sample((32, 256)) * 0.05
    spec, h = weight_spec("intx", "uint3", 32), _hessian(x)
    error = lambda v: (x @ (w - v).t()).pow(2).mean()  # noqa: E731
    plain, clipped = (gptq_quantize(w, h, spec, (1, 32), clip_steps=steps)[0] for steps in (0, 10))
    assert error(clipped) < error(plain)
