"""prepare_pt2e -> calibrate -> convert_pt2e: converted graphs compute what the eager flows compute."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from export_helpers import CHOOSE, DEQUANTIZE, QUANTIZE, count, eager_twin, exported, mlp, outlier_inputs, quantized_graph

import lowbit
from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e

STATIC = [lowbit.StaticInt8(), lowbit.StaticInt8(smoothing=None), lowbit.StaticInt8(act_symmetric=True, smoothing=0.5),
          lowbit.StaticFloat8()]
DYNAMIC_AND_WEIGHT_ONLY = [lowbit.Int8DynamicActivation(), lowbit.Int8DynamicActivation(act_symmetric=True),
                           lowbit.Int8WeightOnly(), lowbit.Int4WeightOnly(group_size=32), lowbit.Float8WeightOnly(),
                           lowbit.IntxWeightOnly(bits=3, group_size=32)]


def _act_scales(graph) -> list[float]:
    """The static activation scales of a converted graph, in graph order."""
    return [float(getattr(graph, n.args[1].target)) for n in graph.graph.nodes
            if n.target is QUANTIZE and n.args[1].op == "get_attr"]


@pytest.mark.parametrize("config", STATIC, ids=lambda c: c.label())
def test_static_graph_computes_what_the_eager_static_config_computes(config):
    model, data = mlp(), outlier_inputs()
    reference = replace(config, kernel="reference")
    graph = quantized_graph(model, reference, data)
    eager = eager_twin(model, reference, data)
    eager_scales = [float(m.weight.act_scale) for m in eager if isinstance(m, nn.Linear)]
    assert _act_scales(graph) == eager_scales  # same calibration -> the very same scales
    x = torch.randn(5, 16) * 4
    # same scales and int8 values: only the float summation order of the two F.linear calls may differ
    torch.testing.assert_close(graph(x), eager(x), rtol=1e-5, atol=1e-5)
    assert count(graph, QUANTIZE) == 3 and count(graph, DEQUANTIZE) == 6


def test_smoothing_gives_each_linear_its_own_edge_and_plain_static_shares_one():
    class Fan(nn.Module):  # one input read by three linears, as Q/K/V are
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

        def forward(self, x):
            return self.q(x) + self.k(x) * self.v(x)

    model, data = Fan().eval(), outlier_inputs()
    shared = quantized_graph(model, lowbit.StaticInt8(smoothing=None), data)
    smoothed = quantized_graph(model, lowbit.StaticInt8(), data)
    assert count(shared, QUANTIZE) == 1
    assert count(smoothed, QUANTIZE) == 3 and count(smoothed, torch.ops.aten.div.Tensor) == 3
    eager = eager_twin(model, replace(lowbit.StaticInt8(), kernel="reference"), data)
    graph = quantized_graph(model, replace(lowbit.StaticInt8(), kernel="reference"), data)
    x = data[0][:7]
    torch.testing.assert_close(graph(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", DYNAMIC_AND_WEIGHT_ONLY, ids=lambda c: c.label())
def test_dynamic_and_weight_only_graphs_compute_what_quantize_computes(config):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    data = [torch.randn(8, 64)]
    reference = replace(config, kernel="reference")
    graph = quantized_graph(model, reference, data)
    eager = eager_twin(model, reference, data)
    x = torch.randn(3, 64)
    torch.testing.assert_close(graph(x), eager(x), rtol=1e-5, atol=1e-5)
    dynamic = config.spec().activation is not None
    assert count(graph, CHOOSE) == (2 if dynamic else 0) and count(graph, QUANTIZE) == (2 if dynamic else 0)
    assert count(graph, DEQUANTIZE) == (4 if dynamic else 2)


def test_converted_graph_keeps_quantized_weights_and_drops_the_float_ones():
    model, data = mlp(), outlier_inputs()
    graph = quantized_graph(model, lowbit.StaticInt8(), data)
    state = graph.state_dict()
    weights = [v for k, v in state.items() if k.endswith("weight_q")]
    assert len(weights) == 3 and all(w.dtype == torch.int8 for w in weights)
    assert not any(k.endswith(".weight") for k in state)  # the float copies are gone
    assert not any(n.op == "call_module" and "observer" in str(n.target) for n in graph.graph.nodes)
    assert torch.allclose(graph(data[0]), model(data[0]), atol=0.1 * model(data[0]).abs().max().item())


def test_convert_without_calibration_raises_and_leaves_the_graph_as_it_was():
    prepared = prepare_pt2e(exported(mlp(), torch.randn(4, 16)), X86Quantizer().set_global(lowbit.StaticInt8()))
    code = prepared.code
    with pytest.raises(lowbit.NotCalibratedError, match="saw no data"):
        convert_pt2e(prepared)
    assert prepared.code == code
    prepared(torch.randn(4, 16))
    convert_pt2e(prepared)


def test_int8_mixed_bf16_graph_dequantizes_to_the_tensor_dtype():
    model = mlp().to(torch.bfloat16)
    data = [x.to(torch.bfloat16) for x in outlier_inputs()]
    graph = quantized_graph(model, lowbit.StaticInt8(), data)
    dtypes = {n.args[-1] for n in graph.graph.nodes if n.target is DEQUANTIZE}
    assert dtypes == {torch.bfloat16}
    assert graph(data[0]).dtype == torch.bfloat16


@pytest.mark.parametrize("config, freezing", [(lowbit.StaticInt8(), False), (lowbit.StaticInt8(), True),
                                              (lowbit.Int8DynamicActivation(), False)],
                         ids=["static", "static-freezing", "dynamic"])
def test_compiled_converted_graph_runs_the_fused_kernels(config, freezing):
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=freezing, fx_graph_cache=False):  # a cached compile would not run the pass
        _check_compiled_lowering(config)


def _check_compiled_lowering(config):
    from torch._dynamo.utils import counters

    model, data = mlp(), outlier_inputs()
    graph = quantized_graph(model, config, data)
    torch._dynamo.reset()
    counters["lowbit"].clear()
    compiled = torch.compile(graph)
    x = data[0][:9]
    with torch.no_grad():
        out = compiled(x)
    assert sum(counters["lowbit"].values()) == 3  # every quantized linear, none left to the float path
    # the fused kernel rounds its int32 accumulation to float once: a few float32 ulps of the Q/DQ graph's sums
    torch.testing.assert_close(out, graph(x), rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert compiled(x).dtype == torch.bfloat16


def test_compiled_cnn_lowers_convolutions_in_plain_calls_and_inference_mode():
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from lowbit.embedded import digits_cnn

    model, x = digits_cnn().eval(), torch.randn(8, 1, 8, 8)
    graph = quantized_graph(model, lowbit.StaticInt8(), [x])
    assert not any(p.requires_grad for p in graph.parameters())  # plain calls compile an inference graph
    with inductor_config.patch(fx_graph_cache=False):
        for mode in (torch.enable_grad, torch.inference_mode):  # conv outputs are channels-last; frozen-free weights
            torch._dynamo.reset()
            counters["lowbit"].clear()
            with mode():
                out = torch.compile(graph)(x)
            assert dict(counters["lowbit"]) == {"conv_static_relu": 4, "conv_static_add_relu": 2, "linear_static": 1}
            assert _cosine(out, graph(x)) > 0.999


def _cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_lowering_survives_a_library_that_sets_the_pre_grad_pass_later():
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    seen = []
    graph = quantized_graph(mlp(), lowbit.StaticInt8(), outlier_inputs())
    with inductor_config.patch(fx_graph_cache=False):
        inductor_config.pre_grad_custom_pass = seen.append  # as torchao's x86 quantizer does on import
        try:
            torch._dynamo.reset()
            counters["lowbit"].clear()
            with torch.no_grad():
                torch.compile(graph)(torch.randn(3, 16))
        finally:
            inductor_config.pre_grad_custom_pass = None
            lowbit.export.lowering.register()
    assert len(seen) == 1 and sum(counters["lowbit"].values()) == 3  # both passes ran
