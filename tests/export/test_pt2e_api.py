"""The export flow's API: the torch.ao names, overrides, custom quantizers with shared / fixed / derived specs,
graph QAT, train/eval switching, and the errors bad input gets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from export_helpers import CHOOSE, DEQUANTIZE, QUANTIZE, count, exported, mlp, outlier_inputs

import lowbit
from lowbit.export import (
    DerivedQuantizationSpec, FixedQParamsQuantizationSpec, QuantizationAnnotation, QuantizationSpec, Quantizer,
    SharedQuantizationSpec, X86Quantizer, convert_pt2e, move_exported_model_to_eval, move_exported_model_to_train,
    prepare_pt2e, prepare_qat_pt2e,
)


def _converted(model, quantizer, data):
    prepared = prepare_pt2e(exported(model, data[0], dynamic_batch=True), quantizer)
    for x in data:
        prepared(x)
    return convert_pt2e(prepared)


def _quantized_linears(graph) -> list[str]:
    """Names of the linear nodes whose weight is dequantized from int8."""
    return [n.name for n in graph.graph.nodes if n.target is torch.ops.aten.linear.default
            and n.args[1].target is DEQUANTIZE]


def test_overrides_by_module_name_type_and_function():
    model, data = mlp(), outlier_inputs()
    everything = _converted(model, X86Quantizer().set_global(lowbit.StaticInt8()), data)
    assert len(_quantized_linears(everything)) == 3
    skip_one = _converted(model, X86Quantizer().set_global(lowbit.StaticInt8()).set_module_name("2", None), data)
    assert len(_quantized_linears(skip_one)) == 2
    by_type = _converted(model, X86Quantizer().set_global(lowbit.StaticInt8())
                         .set_module_type(nn.Linear, lowbit.Int8DynamicActivation()), data)
    assert count(by_type, CHOOSE) == 3
    by_function = _converted(model, X86Quantizer().set_object_type(F.linear, lowbit.Int8WeightOnly()), data)
    assert len(_quantized_linears(by_function)) == 3 and count(by_function, QUANTIZE) == 0
    name_beats_type = _converted(model, X86Quantizer().set_module_type(nn.Linear, lowbit.StaticInt8())
                                 .set_module_name("0", None), data)
    assert len(_quantized_linears(name_beats_type)) == 2


def test_embeddings_are_quantized_on_request_only():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.head = nn.Embedding(50, 32), nn.Linear(32, 4)

        def forward(self, ids):
            return self.head(self.table(ids))

    model, ids = Lookup().eval(), [torch.randint(0, 50, (4, 6))]
    plain = _converted(model, X86Quantizer().set_global(lowbit.StaticInt8()), ids)
    assert count(plain, DEQUANTIZE) == 2  # the head's input and weight; the table stays float
    asked = _converted(model, X86Quantizer().set_global(lowbit.StaticInt8())
                       .set_module_type(nn.Embedding, lowbit.Int8WeightOnly()), ids)
    table = next(n for n in asked.graph.nodes if n.target is torch.ops.aten.embedding.default).args[0]
    assert table.target is DEQUANTIZE and getattr(asked, table.args[0].target).dtype == torch.int8
    q, scale, zero_point, block, dtype = [getattr(asked, a.target) if isinstance(a, torch.fx.Node) else a for a in table.args]
    eager = lowbit.quantize_(copy.deepcopy(model), lowbit.Int8WeightOnly(), filter_fn=lambda m, fqn: fqn == "table")
    assert torch.equal(DEQUANTIZE(q, scale, zero_point, block, dtype), eager.table.weight.dequantize())


class _CustomQuantizer(Quantizer):
    """A backend of its own: a fixed-qparams input, a derived bias spec, an output shared with the input edge."""

    def annotate(self, model):
        act = QuantizationSpec(torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
        weight = QuantizationSpec(torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric)
        for node in model.graph.nodes:
            if node.target is torch.ops.aten.linear.default:
                x, w, b = node.args
                derived = DerivedQuantizationSpec([(x, node)], lambda obs: (obs[0].calculate_qparams()[0] * 0.5, torch.tensor(0)),
                                                  torch.int8, -128, 127, torch.per_tensor_symmetric)
                node.meta["quantization_annotation"] = QuantizationAnnotation({x: act, w: weight, b: derived}, _annotated=True)
            if node.target is torch.ops.aten.sigmoid.default:
                fixed = FixedQParamsQuantizationSpec(torch.uint8, 1 / 256, 0, 0, 255, torch.per_tensor_affine)
                node.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=fixed, _annotated=True)
            if node.target is torch.ops.aten.flatten.using_ints:
                shared = SharedQuantizationSpec(node.args[0])
                node.meta["quantization_annotation"] = QuantizationAnnotation({node.args[0]: shared}, shared, _annotated=True)
        return model

    def validate(self, model):
        pass


def test_custom_quantizer_with_fixed_derived_and_shared_specs():
    model = nn.Sequential(nn.Linear(16, 8), nn.Sigmoid(), nn.Flatten(0)).eval()
    data = [torch.randn(32, 16)]
    graph = _converted(model, _CustomQuantizer(), data)
    quantized = [n for n in graph.graph.nodes if n.target is QUANTIZE]
    assert [n.args[4] for n in quantized] == ["int8", "int8", "uint8", "uint8"]  # input, bias, sigmoid, flatten
    assert all(getattr(graph, n.args[1].target) == 1 / 256 for n in quantized[2:])  # fixed, then shared with it
    linear = next(n for n in graph.graph.nodes if n.target is torch.ops.aten.linear.default)
    act_scale = float(getattr(graph, linear.args[0].args[0].args[1].target))
    bias_dq = linear.args[2]
    assert bias_dq.target is DEQUANTIZE and float(getattr(graph, bias_dq.args[1].target)) == pytest.approx(act_scale * 0.5)
    # the sigmoid's [0, 1) output on a 1/256 grid: within half a step of the float model plus the int8 input's effect
    assert torch.allclose(graph(data[0]), model(data[0]), atol=0.02)


def test_graph_qat_trains_and_converts_to_what_it_computed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    y = torch.sin(x[:, :4] * 2) + x[:, 4:8]  # a function the network can learn
    graph = exported(model.train(), x)
    prepared = prepare_qat_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8(smoothing=None)))
    move_exported_model_to_train(prepared)
    assert any(p.requires_grad for p in prepared.parameters())
    optimizer = torch.optim.Adam(prepared.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(prepared(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        fake = prepared(x)
    converted = convert_pt2e(prepared)
    assert count(converted, QUANTIZE) == 2 and not any("observer" in str(n.target) for n in converted.graph.nodes)
    torch.testing.assert_close(converted(x), fake, rtol=1e-5, atol=1e-5)  # same qparams, same rounding


def test_train_eval_switch_flips_dropout_in_the_graph():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)).train()
    graph = exported(model, torch.randn(4, 16))
    x = torch.randn(4, 16)
    move_exported_model_to_eval(graph)
    assert torch.equal(graph(x), graph(x))
    move_exported_model_to_train(graph)
    assert not torch.equal(graph(x), graph(x))


def test_bad_input_gets_clear_errors_and_leaves_the_graph_alone():
    model = mlp()
    with pytest.raises(TypeError, match="torch.export.export"):
        prepare_pt2e(model, X86Quantizer().set_global(lowbit.StaticInt8()))
    graph = exported(model, torch.randn(4, 16))
    with pytest.raises(TypeError, match="Quantizer"):
        prepare_pt2e(graph, lowbit.StaticInt8())
    with pytest.raises(TypeError, match="lowbit config"):
        X86Quantizer().set_global("int8")
    with pytest.raises(TypeError, match="QATConfig"):
        X86Quantizer().set_global(lowbit.QATConfig(lowbit.StaticInt8()))
    with pytest.raises(ValueError, match="set_object_type"):
        X86Quantizer().set_object_type(torch.relu, lowbit.StaticInt8())
    with pytest.raises(ValueError, match="min/max observer"):
        prepare_pt2e(exported(model, torch.randn(4, 16)), X86Quantizer().set_global(lowbit.StaticInt8(observer="histogram")))
    graph = exported(nn.Sequential(nn.Linear(48, 8)).eval(), torch.randn(2, 48))
    code = graph.code
    with pytest.raises(ValueError, match="multiple of 32"):
        prepare_pt2e(graph, X86Quantizer().set_global(lowbit.Int4WeightOnly(group_size=32)))
    assert graph.code == code and "quantization_annotation" not in str([n.meta.keys() for n in graph.graph.nodes])
    with pytest.raises(ValueError, match="not prepared"):
        convert_pt2e(exported(model, torch.randn(4, 16)))
    prepared = prepare_pt2e(exported(model, torch.randn(4, 16)), X86Quantizer().set_global(lowbit.StaticInt8()))
    with pytest.raises(ValueError, match="already prepared"):
        prepare_pt2e(prepared, X86Quantizer().set_global(lowbit.StaticInt8()))
