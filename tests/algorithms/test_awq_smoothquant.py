"""AWQ's scale and clipping searches and SmoothQuant's statistics on plain tensors."""

import torch

from lowbit.algorithms.awq import ActivationSampleCollector, awq_clipped_qparams, awq_scales
from lowbit.algorithms.smoothquant import ChannelMaxCollector
from lowbit.primitives.affine import choose_qparams, dequantize, quantize
from lowbit.primitives.fake_quantize import fake_quantize
from lowbit.specs import weight_spec

SPEC, BLOCK = weight_spec("intx", "uint3", 32), (1, 32)


def _outlier_inputs(tokens=2048, features=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, :4] *= 30.0  # a few salient channels, as in language models
    return x


def test_the_sample_collector_keeps_a_bounded_uniform_sample_and_the_exact_mean():
    x = _outlier_inputs(3000, 16)
    collector = ActivationSampleCollector(16, samples=500)
    for part in x.split(300):
        collector.add(part)
    collector.add(torch.full((2, 16), float("inf")))
    torch.testing.assert_close(collector.mean_abs, x.abs().mean(0), rtol=1e-5, atol=1e-6)
    assert collector.rows.shape == (500, 16) and collector.tokens == 3000
    late = (collector.rows[:, None, :] == x[None, 1500:, :]).all(-1).any(-1).float().mean()
    assert 0.3 < late < 0.7  # half the tokens came late: about half the sample must be theirs (uniform)


def test_awq_scales_protect_salient_channels_and_never_lose_to_round_to_nearest_on_the_sample():
    torch.manual_seed(0)
    x, w = _outlier_inputs(), torch.randn(64, 128) * 0.05
    collector = ActivationSampleCollector(128, samples=4096)
    collector.add(x)
    s = awq_scales(w, collector, SPEC, BLOCK, grid=20)
    error = lambda w_q: (x @ (w - w_q).t()).pow(2).mean()  # noqa: E731
    rtn = error(fake_quantize(w, BLOCK, "uint3", symmetric=False))
    awq = error(fake_quantize(w * s, BLOCK, "uint3", symmetric=False) / s)
    assert awq < rtn and s[:4].min() > s[4:].max()  # the salient channels are scaled up the most


def test_awq_with_a_grid_of_one_is_round_to_nearest():
    collector = ActivationSampleCollector(128, samples=256)
    collector.add(_outlier_inputs(256))
    assert torch.equal(awq_scales(torch.randn(8, 128), collector, SPEC, BLOCK, grid=1), torch.ones(128))


def test_awq_clipping_lowers_each_groups_output_error():
    torch.manual_seed(0)
    x, w = _outlier_inputs(512), torch.distributions.StudentT(2.0).sample((32, 128)) * 0.05
    full = choose_qparams(w, BLOCK, "uint3", symmetric=False)
    clipped = awq_clipped_qparams(w, x, SPEC, BLOCK, steps=20)

    def group_errors(qp):
        d = (w - dequantize(quantize(w, *qp, BLOCK, "uint3"), *qp, BLOCK)).reshape(32, 4, 32)
        xg = x.reshape(-1, 4, 32)
        return torch.einsum("mgi,ngi->mng", xg, d).pow(2).sum(0)  # (N, G)

    assert (group_errors(clipped) <= group_errors(full) * (1 + 1e-5)).all()
    assert group_errors(clipped).sum() < group_errors(full).sum()
    assert torch.equal(awq_clipped_qparams(w, x, SPEC, BLOCK, steps=0)[0], full[0])


def test_channel_max_collector_skips_non_finite_tokens():
    collector = ChannelMaxCollector(3)
    collector.add(torch.tensor([[1.0, -5.0, 2.0], [float("nan"), 100.0, 0.0], [-3.0, 1.0, 0.5]]))
    assert torch.equal(collector.max_abs, torch.tensor([3.0, 5.0, 2.0])) and collector.tokens == 2
